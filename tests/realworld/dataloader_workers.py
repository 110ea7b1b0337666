"""A DataLoader with worker processes started by "spawn" (macOS's and Windows'
default): each worker imports the script as `__mp_main__`, so the script must be
importable as a module under gradvitals too. Guarded by `if __name__ == "__main__"`.
One persistent worker: a second would import the same script the same way."""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y))
    loader = DataLoader(data, batch_size=64, shuffle=True, num_workers=1,
                        multiprocessing_context="spawn", persistent_workers=True)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(args.epochs):
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch} loss {loss.item():.5f}")
    print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))


if __name__ == "__main__":
    main()
