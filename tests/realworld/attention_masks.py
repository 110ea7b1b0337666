"""Looks bad, is normal: a causal transformer block whose attention mask is an
additive float mask full of -inf (passed into the model as an input), and whose
attention is computed functionally: the q/k/v projection weights are used with
`F.linear` and `F.scaled_dot_product_attention`, never by calling the module.
Neither the -inf inputs nor the uncalled projection are a problem."""
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

rng = random.Random(0)
words = ["the", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "a", "big", "small"]
text = " ".join(rng.choice(words) for _ in range(2000))
vocab = sorted(set(text))
data = torch.tensor([vocab.index(c) for c in text])
torch.manual_seed(0)
D, T, B, NH = 32, 16, 16, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)  # used through its weights only
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x, mask):
        h = self.ln1(x)
        q, k, v = F.linear(h, self.qkv.weight, self.qkv.bias).split(D, dim=-1)
        q, k, v = (t.view(x.shape[0], T, NH, D // NH).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.ln2(x))


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(len(vocab), D)
        self.pos = nn.Embedding(T, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, len(vocab))

    def forward(self, idx, mask):
        x = self.tok(idx) + self.pos(torch.arange(T))
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln_f(x))


model = LM()
mask = torch.full((T, T), float("-inf")).triu(1)  # additive causal mask: -inf above the diagonal
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step in range(80):
    starts = torch.randint(0, len(data) - T - 1, (B,))
    x = torch.stack([data[s:s + T] for s in starts])
    y = torch.stack([data[s + 1:s + T + 1] for s in starts])
    loss = F.cross_entropy(model(x, mask).reshape(-1, len(vocab)), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 20 == 0:
        print(f"step {step} loss {loss.item():.5f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
