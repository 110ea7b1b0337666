"""A model with no nn.Module: raw tensors with requires_grad, an optimizer over them.
`--nan-weight-at K` writes a NaN into the output weights at step K; `--nan-loss-at K`
makes the hand-written log-softmax loss overflow at step K (logits x 1e4)."""
import argparse

import torch
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--nan-weight-at", type=int, default=-1)
ap.add_argument("--nan-loss-at", type=int, default=-1)
args = ap.parse_args()

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
W1 = (torch.randn(64, 128) * 64 ** -0.5).requires_grad_()
b1 = torch.zeros(128, requires_grad=True)
W2 = (torch.randn(128, 10) * 128 ** -0.5).requires_grad_()
opt = torch.optim.SGD([W1, b1, W2], lr=0.1, momentum=0.9)
for step in range(args.steps):
    if step == args.nan_weight_at:
        with torch.no_grad():
            W2[3, 4] = float("nan")
    idx = torch.randint(0, len(X), (64,))
    logits = torch.relu(X[idx] @ W1 + b1) @ W2
    if step == args.nan_loss_at:
        logits = logits * 1e4
    p = torch.softmax(logits, 1)
    loss = -torch.log(p[torch.arange(64), y[idx]]).mean()  # log(0) = -inf when p underflows
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step} loss {loss.item():.5f}")
print("CHECKSUM", repr(float(sum(t.detach().double().sum() for t in (W1, b1, W2)))))
