"""Issue 25: a 50-layer tanh MLP on the digits. With `--std 0.01` every weight is
drawn from N(0, 0.01): each layer multiplies the backward signal by ~0.1, so after
~40 layers the early layers' gradients underflow float32 and are exactly 0.0 on
every step while the last layers' are not -- the extreme of vanishing gradients.
The default (Xavier init, 8 layers) is the healthy twin."""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--depth", type=int, default=8)
ap.add_argument("--std", type=float, default=0.0, help="N(0, std) weights; 0: Xavier")
args = ap.parse_args()

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
W = 64
layers: list[nn.Module] = []
for i in range(args.depth):
    layers += [nn.Linear(64 if i == 0 else W, W), nn.Tanh()]
model = nn.Sequential(*layers, nn.Linear(W, 10))
for m in model.modules():
    if isinstance(m, nn.Linear):
        if args.std > 0:
            nn.init.normal_(m.weight, 0.0, args.std)
        else:
            nn.init.xavier_normal_(m.weight)
        nn.init.zeros_(m.bias)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for step in range(args.steps):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 20 == 0:
        first = model[0].weight.grad.abs().max().item()
        print(f"step {step} loss {loss.item():.4f} max |grad| of layer 0 {first:.3g}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
