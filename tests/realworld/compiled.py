"""Pattern 5: `torch.compile` (default in nanoGPT-style trainers). On CPU the
inductor backend needs a C++ toolchain and minutes of compile time, so the test
uses `--backend aot_eager`: the same Dynamo graph capture, AOT autograd, and hook
handling, without code generation. `--eager` runs the same model uncompiled."""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--backend", default="inductor")
ap.add_argument("--eager", action="store_true")
ap.add_argument("--steps", type=int, default=30)
args = ap.parse_args()
torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 10))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
fwd = model if args.eager else torch.compile(model, backend=args.backend)
for step in range(args.steps):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(fwd(X[idx]), y[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step} loss {loss.item():.6f}")
if not args.eager:
    import torch._dynamo.utils as du
    print("graph breaks", sum(du.counters["graph_break"].values()))
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
