# healthy: true
# forbid: architecture_risk, nonfinite, vanishing_gradients, exploding_gradients
"""A 4-layer Pre-LN transformer language model (`norm_first=True`, as in GPT-2 and
most modern LLMs) with a final LayerNorm, Adam at 1e-3 with a 20-step linear
warmup. The residual stream is an identity path from the loss to the embeddings,
so every layer gets a healthy gradient: the chapter's recommended layout."""
import random

import torch
import torch.nn as nn

rng = random.Random(0)
words = ["the", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "a", "big", "small"]
text = " ".join(rng.choice(words) for _ in range(3000))
vocab = sorted(set(text))
data = torch.tensor([vocab.index(c) for c in text])

torch.manual_seed(0)
D, T, B = 32, 16, 16


class PreLNLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(vocab), D)
        self.pos = nn.Parameter(torch.zeros(T, D))
        layer = nn.TransformerEncoderLayer(D, nhead=4, dim_feedforward=64, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=4, norm=nn.LayerNorm(D),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(D, len(vocab))

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        h = self.encoder(self.embed(idx) + self.pos[: idx.shape[1]], mask=mask, is_causal=True)
        return self.head(h)


model = PreLNLM()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))

for step in range(100):
    starts = torch.randint(0, len(data) - T - 1, (B,))
    x = torch.stack([data[s:s + T] for s in starts])
    y = torch.stack([data[s + 1:s + T + 1] for s in starts])
    loss = nn.functional.cross_entropy(model(x).reshape(-1, len(vocab)), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    warmup.step()
    if step % 20 == 0:
        print(f"step {step} loss {loss.item():.4f}")
