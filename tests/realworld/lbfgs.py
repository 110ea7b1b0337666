"""Pattern 2b: a closure optimizer. LBFGS calls the closure (zero_grad, forward,
backward) up to 20 times per `step()`; its line-search trial losses go up and
down inside a step, which is normal."""
import torch
import torch.nn as nn

torch.manual_seed(0)
x = torch.linspace(-3, 3, 200).unsqueeze(1)
target = torch.sin(x) + 0.1 * x ** 2
model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=20, history_size=10,
                        line_search_fn="strong_wolfe")
evals = 0


def closure():
    global evals
    evals += 1
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), target)
    loss.backward()
    return loss


for step in range(15):
    loss = opt.step(closure)
    print(f"step {step} loss {loss.item():.6e}")
print("closure evaluations", evals)
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
