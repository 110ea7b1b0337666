# healthy: true
# forbid: vanishing_gradients, exploding_gradients, dead_relu, nonfinite
"""A 20-block residual MLP on digits: `x = x + W2 relu(W1 x)` with He init and the
second layer of each block scaled down (1/sqrt(blocks)), no normalisation at all.
The identity path (dy/dx = dF/dx + 1) carries the gradient to the first block:
deep without normalisation, yet its signal propagates well (at most `info`)."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
BLOCKS = 20


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(64, 64)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")
        nn.init.zeros_(self.fc1.bias)
        nn.init.kaiming_normal_(self.fc2.weight, nonlinearity="relu")
        with torch.no_grad():
            self.fc2.weight.mul_(BLOCKS ** -0.5)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


model = nn.Sequential(nn.Linear(64, 64), *[Block() for _ in range(BLOCKS)], nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

for step in range(150):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
