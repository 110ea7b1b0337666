"""A causal language model on nn.TransformerEncoder, as the PyTorch word-language-model
example builds it: the causal mask is `nn.Transformer.generate_square_subsequent_mask`
(-inf above the diagonal), made in the model's forward and passed to the encoder, which
builds another -inf mask inside its own forward to check whether it is causal. At
`--lr 10` (SGD, no clipping) the weights overflow within a few steps and the loss goes
NaN: the -inf masks are by design; the first NaN/Inf is computed from finite values
later.
"""
import argparse
import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--lr", type=float, default=0.1)
ap.add_argument("--steps", type=int, default=40)
args = ap.parse_args()

rng = random.Random(0)
words = ["the", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "a", "big", "small"]
text = " ".join(rng.choice(words) for _ in range(3000))
vocab = sorted(set(text))
data = torch.tensor([vocab.index(c) for c in text])
torch.manual_seed(0)
D, T, B = 32, 24, 16


class CharTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(len(vocab), D)
        self.pos = nn.Embedding(T, D)
        layer = nn.TransformerEncoderLayer(D, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(D, len(vocab))

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.encoder(x, mask))


model = CharTransformer()
opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
for step in range(args.steps):
    starts = torch.randint(0, len(data) - T - 1, (B,))
    x = torch.stack([data[s:s + T] for s in starts])
    y = torch.stack([data[s + 1:s + T + 1] for s in starts])
    loss = F.cross_entropy(model(x).reshape(-1, len(vocab)), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 5 == 0 or not math.isfinite(loss.item()):
        print(f"step {step} loss {loss.item():.5f}")
    if not math.isfinite(loss.item()):
        break
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
