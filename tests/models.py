"""Small real models for tests (no downloads)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(depth: int = 6, width: int = 32, act: type[nn.Module] = nn.ReLU, d_in: int = 64, n_out: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = self.features(x.view(-1, 1, 8, 8))
        return self.head(x.flatten(1))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        out, _ = self.lstm(x.view(-1, 8, 8))
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.encoder(self.proj(x.view(-1, 8, 8)))
        return self.head(h.mean(1))


FACTORIES = {
    "mlp": lambda: mlp(),
    "cnn_bn": SmallCNN,
    "lstm": LSTMClassifier,
    "transformer": TinyTransformer,
}


def train(model: nn.Module, X, y, steps: int = 12, lr: float = 1e-2, seed: int = 0, opt_cls=torch.optim.Adam,
          clip: float | None = None, batch: int = 32):
    """A plain loop; returns the losses (floats)."""
    g = torch.Generator().manual_seed(seed)
    opt = opt_cls(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(X), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return losses, opt
