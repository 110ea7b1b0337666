"""A deep ReLU MLP with every weight drawn from N(0, 1) (no fan-in scaling), trained by
Adam on 64 samples with random labels (full batch): the gradients are so large their
float32 norm overflows to Inf for the first steps, then every value is finite again,
but the softmax is saturated: the loss is exactly 0.0 and every gradient exactly 0 to
the end. Finite, not recovered: nothing can learn any
more. `--init he`: the same network with He init (it trains)."""
import argparse

import torch
import torch.nn as nn

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=100)
ap.add_argument("--init", choices=["normal", "he"], default="normal")
args = ap.parse_args()

torch.manual_seed(0)
layers = []
for i in range(19):
    layers += [nn.Linear(64 if i == 0 else 256, 256), nn.ReLU()]
model = nn.Sequential(*layers, nn.Linear(256, 10))
for m in model.modules():
    if isinstance(m, nn.Linear):
        if args.init == "normal":
            nn.init.normal_(m.weight, 0.0, 1.0)
        else:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.zeros_(m.bias)
X = torch.randn(64, 64)
y = torch.randint(0, 10, (64,))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(args.steps):
    loss = nn.functional.cross_entropy(model(X), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step} loss {loss.item():.6g}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
