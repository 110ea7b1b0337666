"""Pattern 4: in-place activations right after hooked modules (ResNet/DCGAN style):
`LeakyReLU(inplace=True)` after a Linear, `ReLU(inplace=True)` after BatchNorm,
and an in-place residual add `out += identity`."""
import torch
import torch.nn as nn
from digits_data import load_digits


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.LeakyReLU(0.1, inplace=True))
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 64, 64), nn.LeakyReLU(0.1, inplace=True),
                                  nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
y = torch.tensor(y)
model = Net()
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for step in range(30):
    idx = torch.randint(0, len(X), (32,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step} loss {loss.item():.6f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
