"""An optimizer re-created at every epoch (older tutorials decay the learning rate
this way: `optimizer = optim.SGD(model.parameters(), lr=lr)` inside the epoch
loop). The old optimizer is garbage; the run still has one optimizer at a time."""
import torch
import torch.nn as nn
from digits_data import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
lr = 0.2
for epoch in range(4):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for i in range(25):
        idx = torch.randint(0, len(X), (64,))
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch} lr {lr} loss {loss.item():.5f}")
    lr *= 0.5
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
