"""Pattern 9: scripts that end by themselves, badly.
--mode overflow : the loss explodes and the log line's perplexity, `math.exp(loss)`,
                  raises OverflowError mid-run (exit 1).
--mode sigint   : Ctrl-C (SIGINT) arrives mid-run (KeyboardInterrupt).
--mode early    : crashes reading its data, before any model exists (exit 1)."""
import argparse
import math
import os
import signal

import torch
import torch.nn as nn

ap = argparse.ArgumentParser()
ap.add_argument("--mode", choices=["overflow", "sigint", "early"], required=True)
args = ap.parse_args()
if args.mode == "early":
    with open("data/train.bin", "rb") as f:  # not there
        data = f.read()

torch.manual_seed(0)
x = torch.randn(128, 16)
target = x.sum(1, keepdim=True) * 3
model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.2 if args.mode == "overflow" else 0.01)
for it in range(40):
    loss = nn.functional.mse_loss(model(x), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"iter {it} loss {loss.item():.4g} ppl {math.exp(loss.item()):.4g}", flush=True)
    if args.mode == "sigint" and it == 10:
        os.kill(os.getpid(), signal.SIGINT)
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
