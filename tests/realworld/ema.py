"""Pattern: an exponential moving average of the weights, evaluated beside the trained model:
torch.optim.swa_utils.AveragedModel and a hand-rolled deepcopy updated with lerp_ under
no_grad. Neither is in an optimizer and neither gets a gradient, by design."""
import copy, torch, torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from digits_data import load_digits
torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32); y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
ema2 = copy.deepcopy(model)  # hand-rolled EMA
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(60):
    idx = torch.randint(0, len(X), (32,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad(); loss.backward(); opt.step()
    ema.update_parameters(model)
    with torch.no_grad():
        for pe, p in zip(ema2.parameters(), model.parameters()):
            pe.lerp_(p, 0.01)
    if step % 20 == 0:
        ema.eval(); ema2.eval()
        with torch.no_grad():
            acc = (ema(X).argmax(1) == y).float().mean().item(); acc2 = (ema2(X).argmax(1) == y).float().mean().item()
        print(f"step {step} loss {loss.item():.6f} ema acc {acc:.4f} {acc2:.4f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for m in (model, ema, ema2) for v in m.state_dict().values())))
