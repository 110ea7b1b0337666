"""Pattern: the model's forward raises on a bad batch and the script skips it and goes
on (input validation, an out-of-memory retry with a smaller batch). The first batch is
the bad one: it arrives on a step whose forward gradvitals traces."""
import torch
import torch.nn as nn
from digits_data import load_digits


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.body(x)
        if not torch.isfinite(h).all():
            raise ValueError("non-finite features: batch rejected")
        return self.head(h)


torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = Net()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
skipped = 0
for it in range(61):
    idx = torch.randint(0, len(X), (32,))
    xb = X[idx].clone()
    if it == 0:
        xb[0, 0] = float("nan")  # a corrupt sample
    try:
        loss = nn.functional.cross_entropy(model(xb), y[idx])
    except ValueError:
        skipped += 1
        continue
    opt.zero_grad()
    loss.backward()
    opt.step()
print("skipped", skipped)
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
