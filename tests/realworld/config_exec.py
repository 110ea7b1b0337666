"""Pattern 8: a config system that `exec`s files into the script's globals and
treats every scalar global as a config key (nanoGPT's train.py). Run from this
folder: `python config_exec.py config/small.py --learning_rate=0.05`. Any name the
runner injected into the globals, a different `sys.argv`, cwd or `sys.path[0]`
would change what it prints."""
import os
import sys

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
learning_rate = 0.1
n_hidden = 32
max_iters = 20
seed = 1337
eval_interval = 10
log_prefix = "train"
compile = False
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
exec(open("configurator.py").read())  # cwd-relative, as in nanoGPT
config = {k: globals()[k] for k in config_keys}
print("config", config)
print("argv", sys.argv)
print("path0", sys.path[0] == os.path.dirname(os.path.abspath(__file__)), "cwd-file", os.path.exists("config/small.py"))
print("main", __name__, __file__, __package__, __spec__, __cached__ if "__cached__" in globals() else "-",
      type(__builtins__).__name__, sorted(k for k in globals() if k.startswith("__")))
print("loader", type(globals().get("__loader__")).__name__)
import helper_module  # a sibling module, found through sys.path[0]
print("helper", helper_module.ANSWER)

torch.manual_seed(seed)
x = torch.randn(256, 8)
target = (x[:, :1] * x[:, 1:2]).tanh()
model = nn.Sequential(nn.Linear(8, n_hidden), nn.Tanh(), nn.Linear(n_hidden, 1))
opt = torch.optim.SGD(model.parameters(), lr=learning_rate)
for it in range(max_iters):
    loss = nn.functional.mse_loss(model(x), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if it % eval_interval == 0:
        print(f"{log_prefix} iter {it} loss {loss.item():.6f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
