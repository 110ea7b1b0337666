"""Pattern: activation checkpointing (torch.utils.checkpoint), both implementations:
the blocks' forwards run again inside the backward. ``--reentrant`` uses the old
reentrant one (its backward calls torch.autograd.backward itself); ``--nan-step N``
sets one block's weights so large (finite) that its output overflows to inf there: the
origin must be found inside a checkpointed block."""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits
from torch.utils.checkpoint import checkpoint

p = argparse.ArgumentParser()
p.add_argument("--reentrant", action="store_true")
p.add_argument("--nan-step", type=int, default=-1)
a = p.parse_args()


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(64, 64)
        self.blocks = nn.ModuleList(Block(64) for _ in range(4))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = checkpoint(b, h, use_reentrant=a.reentrant)
        return self.head(h)


torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = Net()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(40):
    if step == a.nan_step:
        with torch.no_grad():
            model.blocks[2].fc.weight.fill_(1e38)  # finite, but the block's output overflows to inf
    idx = torch.randint(0, len(X), (32,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step} loss {loss.item():.6f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
