"""Pattern 6: mixed precision with a GradScaler (the torch.amp recipe), on CPU with
float16 autocast. The loss is multiplied by the scale (65536) before backward,
gradients are unscaled in place before clipping, and steps whose gradients
overflowed are skipped by the scaler (it halves the scale): expected, not a NaN.
`--init-scale 16777216` starts the scale too high (2^24), as AMP runs often do, so
the first float16 backward passes overflow and those steps are skipped."""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--init-scale", type=float, default=2.0 ** 16)
args = ap.parse_args()
torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scaler = torch.amp.GradScaler("cpu", init_scale=args.init_scale)
skipped = 0
for it in range(args.steps):
    idx = torch.randint(0, len(X), (64,))
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(X[idx])
        loss = nn.functional.cross_entropy(logits.float(), y[idx])
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.0)
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    if scaler.get_scale() < scale:
        skipped += 1
        print(f"iteration {it}: gradients overflowed, step skipped, scale {scale} -> {scaler.get_scale()}")
    if it % 10 == 0:
        print(f"it {it} loss {loss.item():.5f}")
print("skipped", skipped)
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
