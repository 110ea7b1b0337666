# expect: batchnorm_small_batch
# forbid: nonfinite
"""A small CNN with BatchNorm trained with batches of 2 images (a memory-bound
segmentation habit copied to a classifier). The per-channel statistics come
from 2 samples x a few pixels, so they are noise: training is erratic and the
running statistics used at eval time do not match what the network saw. The
chapter's fix: GroupNorm/LayerNorm (batch-independent), or real batches."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
y = torch.tensor(y)

model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(32 * 16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

for step in range(150):
    idx = torch.randint(0, len(X), (2,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
model.eval()
with torch.no_grad():
    acc = (model(X).argmax(1) == y).float().mean().item()
print(f"eval accuracy {acc:.3f}")
