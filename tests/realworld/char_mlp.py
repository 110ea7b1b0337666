"""Issue 25: functional activations, as people write them. A character-level MLP
(makemore style: an embedding of the last 3 characters -> Linear -> torch.tanh ->
Linear), and with `--cell` a hand-written recurrent cell
(`h = torch.tanh(self.i2h(torch.cat([x, h], 1)))`, the PyTorch char-RNN tutorial's
form). Neither has an nn.Tanh module to hook. At `--lr 5` (SGD) the hidden
pre-activations grow until the tanh is pinned at +-1: its derivative is exactly 0
in float32, and the layers below get gradients of exactly 0.0. `--lr 0.1` is the
healthy twin."""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=120)
ap.add_argument("--lr", type=float, default=5.0)
ap.add_argument("--cell", action="store_true")
ap.add_argument("--init", default="default", choices=["default", "randn"],
                help="randn: every weight from N(0, 1), as in a from-scratch makemore")
args = ap.parse_args()

with open(argparse.__file__, encoding="utf-8") as fh:  # Python's own source: no download
    text = fh.read()[:20000]
vocab = sorted(set(text))
data = torch.tensor([vocab.index(c) for c in text])
torch.manual_seed(0)
CTX, E, H, B = 3, 10, 64, 64


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(len(vocab), E)
        self.hidden = nn.Linear(CTX * E, H)
        self.out = nn.Linear(H, len(vocab))

    def forward(self, idx):
        h = torch.tanh(self.hidden(self.emb(idx).view(idx.shape[0], -1)))
        return self.out(h)


class Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(len(vocab), E)
        self.i2h = nn.Linear(E + H, H)
        self.out = nn.Linear(H, len(vocab))

    def forward(self, idx):
        h = torch.zeros(idx.shape[0], H)
        for t in range(idx.shape[1]):
            h = torch.tanh(self.i2h(torch.cat([self.emb(idx[:, t]), h], 1)))
        return self.out(h)


model = Cell() if args.cell else MLP()
if args.init == "randn":
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape))
opt = torch.optim.SGD(model.parameters(), lr=args.lr)
gen = torch.Generator().manual_seed(1)
for step in range(args.steps):
    ix = torch.randint(0, len(data) - CTX - 1, (B,), generator=gen)
    x = torch.stack([data[i:i + CTX] for i in ix])
    y = data[ix + CTX]
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 20 == 0 or step < 10:
        lin = model.i2h if args.cell else model.hidden
        print(f"step {step} loss {loss.item():.4f} |grad| of {'i2h' if args.cell else 'hidden'} "
              f"{lin.weight.grad.norm().item():.3g}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
