"""Pattern: keep the best model with `torch.save(model, f)` (the whole module, as the
classic word-language-model example does), and at the end reload it with
`model = torch.load(f, weights_only=False)` to evaluate it on test data. The reloaded
model takes part in no backward and no optimizer holds it: it is evaluated, not
trained. `--unused-layer`: the trained model also holds a layer its forward never
uses (a real no_gradient, which must still be reported)."""
import argparse
import os
import tempfile

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--epochs", type=int, default=4)
ap.add_argument("--unused-layer", action="store_true")
args = ap.parse_args()

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
train_x, train_y, val_x, val_y, test_x, test_y = X[:1200], y[:1200], X[1200:1500], y[1200:1500], X[1500:], y[1500:]


class Net(nn.Module):
    def __init__(self, unused: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)
        self.aux = nn.Linear(64, 10) if unused else None  # built, never called

    def forward(self, x):
        return self.head(self.body(x))


model = Net(args.unused_layer)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def evaluate(m, xs, ys):
    m.eval()
    with torch.no_grad():
        return nn.functional.cross_entropy(m(xs), ys).item()


path = os.path.join(tempfile.mkdtemp(), "model.pt")
best = None
for epoch in range(args.epochs):
    model.train()
    perm = torch.randperm(len(train_x))
    for i in range(0, len(perm) - 63, 64):
        idx = perm[i:i + 64]
        loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    val = evaluate(model, val_x, val_y)
    print(f"epoch {epoch} train loss {loss.item():.5f} val loss {val:.5f}")
    if best is None or val < best:
        with open(path, "wb") as f:
            torch.save(model, f)
        best = val

with open(path, "rb") as f:  # load the best saved model
    model = torch.load(f, weights_only=False)
print(f"test loss {evaluate(model, test_x, test_y):.5f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
