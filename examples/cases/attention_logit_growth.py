# expect: attention_logit_growth, attention_entropy_collapse
# forbid: nonfinite, no_gradient
"""A 2-layer GPT (pre-LN, 4 heads, context 32) on Python's own source, trained with AdamW at
lr 0.1 without a warmup and without QK-layernorm. The queries and keys grow with the weights,
so the attention scores q.k grow with their product: the first layer's largest score goes from
~2 to over 1000 in 80 steps, its softmax turns one-hot and the attention entropy collapses.
The fix: LayerNorm on the queries and keys (``QK_NORM = True`` below), or a lower learning
rate with a warmup."""
import inspect
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

QK_NORM = False
torch.manual_seed(0)
text = inspect.getsource(os) + inspect.getsource(inspect)
vocab = sorted(set(text))
data = torch.tensor([vocab.index(c) for c in text])
D, T, B, NH, L = 32, 32, 16, 4, 2


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        if QK_NORM:
            self.q_norm, self.k_norm = nn.LayerNorm(D // NH), nn.LayerNorm(D // NH)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(D, -1)
        q, k, v = (z.view(b, t, NH, D // NH).transpose(1, 2) for z in (q, k, v))
        if QK_NORM:
            q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, D))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention()
        self.fc, self.out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(len(vocab), D), nn.Embedding(T, D)
        self.blocks = nn.Sequential(*[Block() for _ in range(L)])
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, len(vocab))

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln_f(self.blocks(x)))


model = GPT()
opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
gen = torch.Generator().manual_seed(0)
for step in range(80):
    ix = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
    x = torch.stack([data[j:j + T] for j in ix])
    y = torch.stack([data[j + 1:j + T + 1] for j in ix])
    loss = F.cross_entropy(model(x).reshape(-1, len(vocab)), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 20 == 0 or step == 79:
        print(f"step {step} loss {loss.item():.3f}")
