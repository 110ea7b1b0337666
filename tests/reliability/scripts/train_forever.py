"""Trains until killed: an MLP on a synthetic task, one line per optimizer step in --progress
("<steps done> <time.monotonic()>", the clock every process on the machine shares).
--watch PATH: under gv.watch(path=PATH) instead of plain (then run it with python)."""
import argparse
import os
import time

import torch
import torch.nn as nn

p = argparse.ArgumentParser()
p.add_argument("--progress", required=True)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--watch", default=None, metavar="PATH")
p.add_argument("--autosave", type=float, default=60.0)
p.add_argument("--every", type=int, default=25)
p.add_argument("--sleep", type=float, default=0.002)
p.add_argument("--steps", type=int, default=10**9)
a = p.parse_args()

torch.manual_seed(0)
X = torch.randn(512, 64)  # synthetic (no sklearn import: each process starts faster)
y = (X[:, :10].argmax(1) + (X[:, 10] > 0).long()) % 10
layers = [nn.Linear(64, 32), nn.ReLU()]
for _ in range(a.layers - 2):
    layers += [nn.Linear(32, 32), nn.ReLU()]
model = nn.Sequential(*layers, nn.Linear(32, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
watch = None
if a.watch:
    import gradvitals as gv

    watch = gv.watch(model, opt, path=a.watch, autosave_s=a.autosave, every=a.every)
fd = os.open(a.progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
for step in range(a.steps):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    os.write(fd, f"{step + 1} {time.monotonic():.6f}\n".encode())
    if a.sleep:
        time.sleep(a.sleep)
if watch is not None:
    watch.close()
