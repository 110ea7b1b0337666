# expect: architecture_risk
# forbid: nonfinite
"""A 24-layer Post-LN transformer language model (`norm_first=False`, the original
2017 layout) trained with Adam at 1e-3 and no warmup. In Post-LN the LayerNorm
sits after the residual add, so the residual path is normalised at every layer and
the gradient reaching the lower layers depends on a long product of LayerNorm
Jacobians: deep Post-LN stacks are the chapter's textbook unstable architecture.
The fix: Pre-LN (`norm_first=True`) plus warmup (see healthy_preln_transformer.py)."""
import random

import torch
import torch.nn as nn

rng = random.Random(0)
words = ["the", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "a", "big", "small"]
text = " ".join(rng.choice(words) for _ in range(3000))
vocab = sorted(set(text))
data = torch.tensor([vocab.index(c) for c in text])

torch.manual_seed(0)
D, T, B = 32, 16, 8


class PostLNLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(vocab), D)
        self.pos = nn.Parameter(torch.zeros(T, D))
        layer = nn.TransformerEncoderLayer(D, nhead=4, dim_feedforward=64, dropout=0.0,
                                           batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers=24, enable_nested_tensor=False)
        self.head = nn.Linear(D, len(vocab))

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        h = self.encoder(self.embed(idx) + self.pos[: idx.shape[1]], mask=mask, is_causal=True)
        return self.head(h)


model = PostLNLM()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)

for step in range(40):
    starts = torch.randint(0, len(data) - T - 1, (B,))
    x = torch.stack([data[s:s + T] for s in starts])
    y = torch.stack([data[s + 1:s + T + 1] for s in starts])
    loss = nn.functional.cross_entropy(model(x).reshape(-1, len(vocab)), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step} loss {loss.item():.4f}")
