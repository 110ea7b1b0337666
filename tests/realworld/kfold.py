"""K-fold cross-validation: a fresh model and optimizer per fold, trained one after
the other in one script. Each fold's loss starts again from chance; read as one
curve, the second fold's restart looks like the loss going back up (or never
falling). ``--lr`` sets every fold's learning rate; ``--keep-optimizers`` keeps every
fold's optimizer alive in a list (the later folds' losses then go to loss/opt1, ...)."""
import gc
import sys
import weakref

import torch
import torch.nn as nn
from digits_data import load_digits

lr = float(sys.argv[sys.argv.index("--lr") + 1]) if "--lr" in sys.argv else 3e-3
keep = [] if "--keep-optimizers" in sys.argv else None
torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
folds = torch.randperm(len(X)).chunk(3)
total = 0.0
fold_models = []
for k, held_out in enumerate(folds):
    train = torch.cat([f for i, f in enumerate(folds) if i != k])
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if keep is not None:
        keep.append(optimizer)
    for step in range(60):
        idx = train[torch.randint(0, len(train), (64,))]
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        acc = (model(X[held_out]).argmax(1) == y[held_out]).float().mean().item()
    fold_models.append(weakref.ref(model))
    gc.collect()  # the earlier folds' models are garbage: nothing may hold them
    alive = "" if keep is not None else f" models alive {sum(r() is not None for r in fold_models)}"
    print(f"fold {k} train loss {loss.item():.4f} held-out accuracy {acc:.3f}{alive}")
    total += sum(float(v.double().sum()) for v in model.state_dict().values())
print("CHECKSUM", repr(total))
