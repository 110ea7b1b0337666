# healthy: true
# forbid: no_gradient, not_updated, vanishing_gradients
"""Transfer learning with a frozen feature extractor: the backbone's first layer
holds fixed "pretrained" filters (the digits' 32 principal components), the
whole backbone is frozen with `requires_grad_(False)`, and only the new head is
trained. Frozen parameters receive no gradient and never change, by design:
that is neither `no_gradient` nor `not_updated`."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
pca = PCA(n_components=32, random_state=0).fit(X / 16.0)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.backbone(x))


model = Classifier()
with torch.no_grad():  # "load the pretrained weights"
    comps = torch.tensor(pca.components_, dtype=torch.float32)
    model.backbone[0].weight.copy_(torch.cat([comps[:16], -comps[:16]]) * 3.0)
    model.backbone[0].bias.copy_(-model.backbone[0].weight @ torch.tensor(pca.mean_, dtype=torch.float32))
model.backbone.requires_grad_(False)
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

for step in range(100):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 25 == 0:
        print(f"step {step} loss {loss.item():.4f}")
with torch.no_grad():
    acc = (model(X).argmax(1) == y).float().mean().item()
print(f"train accuracy {acc:.3f}")
