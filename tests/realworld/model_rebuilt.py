"""The model built again after its optimizer: a script builds the model and the
optimizer, then builds the model a second time (here to move it to a device and
restore the seed, as a notebook cell run twice does). The optimizer steps the first
model's parameters, which get no gradient; the model that trains gets gradients every
step, and nothing steps it: its weights never change. `--fixed`: the optimizer is
built after the last model (the same script, correct)."""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=80)
ap.add_argument("--fixed", action="store_true")
args = ap.parse_args()

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)


def make_model():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


model = make_model()
if not args.fixed:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
torch.manual_seed(0)
model = make_model().to("cpu")  # built again: the optimizer holds the first one's parameters
if args.fixed:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(args.steps):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 20 == 0:
        print(f"step {step} loss {loss.item():.5f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
