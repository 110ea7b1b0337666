"""Pattern: a torch.jit.script-ed submodule (takes no Python hooks) inside a model wrapped in
nn.DataParallel (on the CPU: a pass-through), whose forward returns a dict with an
auxiliary loss term."""
import torch, torch.nn as nn
from digits_data import load_digits
torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32); y = torch.tensor(y)
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.jit.script(nn.Sequential(nn.Linear(64, 64), nn.ReLU()))
        self.head = nn.Linear(64, 10)
    def forward(self, x):
        out = self.head(self.enc(x))
        return {"logits": out, "loss_aux": out.pow(2).mean()}
model = nn.DataParallel(Net())
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(60):
    idx = torch.randint(0, len(X), (32,))
    out = model(X[idx])
    loss = nn.functional.cross_entropy(out["logits"], y[idx]) + 1e-3 * out["loss_aux"]
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 20 == 0: print(f"step {step} loss {loss.item():.6f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
