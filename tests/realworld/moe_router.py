"""A top-1 mixture of experts: a router picks one expert per sample; an expert that
receives no sample in a batch does not run. The router collapses onto a few experts
(no load-balancing loss): the script prints how many samples each expert received
over the whole run."""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=200)
args = ap.parse_args()


class MoE(nn.Module):
    def __init__(self, n: int = 4, d: int = 64) -> None:
        super().__init__()
        self.router = nn.Linear(d, n)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ReLU()) for _ in range(n))
        self.register_buffer("usage", torch.zeros(n, dtype=torch.long), persistent=False)

    def forward(self, x):
        w = torch.softmax(self.router(x), -1)
        top = w.argmax(-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            sel = top == i
            if sel.any():
                out[sel] = expert(x[sel]) * w[sel, i:i + 1]
            self.usage[i] += int(sel.sum())
        return out


torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), MoE(), nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(args.steps):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.5f}")
print("USAGE", " ".join(str(int(u)) for u in model[2].usage))
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
