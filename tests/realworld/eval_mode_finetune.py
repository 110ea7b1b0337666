"""Fine-tuning with the whole model in eval mode (frozen BatchNorm statistics, no
dropout): `model.eval()` once, then a plain training loop. `--bad-weight-at K` writes
an Inf into the third Linear's weight at step K (a corrupted checkpoint shard)."""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--bad-weight-at", type=int, default=-1)
args = ap.parse_args()

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
layers = []
for i in range(5):
    layers += [nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1)]
model = nn.Sequential(*layers, nn.Linear(64, 10))
with torch.no_grad():  # "pretrained" running statistics
    model.train()
    for _ in range(5):
        model(X[torch.randint(0, len(X), (256,))])
model.eval()  # frozen BatchNorm statistics, no dropout, for the whole fine-tuning run
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for step in range(args.steps):
    if step == args.bad_weight_at:
        with torch.no_grad():
            model[8].weight[3, 5] = float("inf")
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step} loss {loss.item():.5f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
