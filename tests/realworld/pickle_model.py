"""Pattern 3: whole-model pickling. Checkpoints with `torch.save(model)` (not the
state_dict) mid-training, reloads it, and also reloads a state_dict with
`weights_only=True`. Anything gradvitals attached to the modules would be
pickled with them (or make pickling fail)."""
import io
import pickle

import torch
import torch.nn as nn
from digits_data import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1)


def hooks(m: nn.Module) -> int:
    return sum(len(d) for mod in m.modules() for d in (
        mod._forward_hooks, mod._forward_pre_hooks, mod._backward_hooks, mod._backward_pre_hooks))


for step in range(40):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step in (0, 25):  # mid-training checkpoint, while gradvitals records this step
        buf = io.BytesIO()
        torch.save(model, buf)
        blob = pickle.dumps(model)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
        print(f"step {step}: whole-model checkpoint {len(blob)} pickle bytes, hooks on clone {hooks(clone)}, "
              f"hooks on model {hooks(model)}, instance attrs {sorted(vars(model))}")
        sd = io.BytesIO()
        torch.save(model.state_dict(), sd)
        sd.seek(0)
        state = torch.load(sd, weights_only=True)
        print("state_dict keys", list(state))
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in clone.state_dict().values())),
      repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
