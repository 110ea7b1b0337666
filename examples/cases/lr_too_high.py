# expect: nonfinite, loss_spike, exploding_gradients
# forbid: dead_relu, vanishing_gradients
"""A tanh MLP regressing the digit's value (MSE) with SGD at lr=0.1, far above
the ~2/curvature this loss tolerates. Each step overshoots further than the last:
the loss jumps from ~10 to 10^3 in two steps, grows ~1000x per step, and
overflows to Inf and then NaN around step 16. Growth was visible for a dozen
steps. The chapter's fix: lower the learning rate (update/weight ratio ~1e-3),
warm it up, clip gradients."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
target = torch.tensor(y, dtype=torch.float32).unsqueeze(1)

model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)

for step in range(40):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.mse_loss(model(X[idx]), target[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 4 == 0:
        print(f"step {step} loss {loss.item():.4g}")
