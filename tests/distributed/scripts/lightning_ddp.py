"""A LightningModule trained with Trainer(strategy="ddp") on 2 CPU processes under
torchrun, with gradvitals' GradVitalsCallback: Lightning wraps the module in
DistributedDataParallel itself, so the callback never sees the wrapper called.
``--drift-step N``: at batch N rank 1 adds 1e-3 to a bias outside the optimizer (a
rank-dependent in-place update: the replicas differ from then on, silently).
argv[1]: the report folder."""
import argparse

import lightning as L
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

from gradvitals.integrations.lightning import GradVitalsCallback

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--drift-step", type=int, default=-1)
args = ap.parse_args()


class MLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx == args.drift_step and self.global_rank == 1:
            with torch.no_grad():
                self.net[0].bias.add_(1e-3)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


X, y = load_digits(return_X_y=True)
data = torch.utils.data.TensorDataset(torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=30, logger=False,
                    callbacks=[GradVitalsCallback(args.out, every=5, quiet=True)], enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(MLP(), torch.utils.data.DataLoader(data, batch_size=64))
