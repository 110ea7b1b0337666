"""Pattern: a WGAN-GP whose critic uses spectral_norm and whose generator uses weight_norm
(torch.nn.utils.parametrizations: reading `layer.weight` runs the parametrization, and
spectral_norm's runs a power iteration that updates its buffers), channels_last tensors,
and a gradient penalty through torch.autograd.grad(create_graph=True)."""
import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm
from digits_data import load_digits
torch.manual_seed(0)
X, _ = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8).contiguous(memory_format=torch.channels_last)
G = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), weight_norm(nn.Linear(128, 64)), nn.Sigmoid())
D = nn.Sequential(spectral_norm(nn.Conv2d(1, 16, 3, padding=1)), nn.LeakyReLU(0.2), nn.Flatten(),
                  spectral_norm(nn.Linear(16 * 64, 1))).to(memory_format=torch.channels_last)
og = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.5, 0.9))
od = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.9))
for it in range(30):
    real = X[torch.randint(0, len(X), (32,))]
    fake = G(torch.randn(32, 16)).reshape(-1, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    eps = torch.rand(32, 1, 1, 1)
    interp = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    grads = torch.autograd.grad(D(interp).sum(), interp, create_graph=True)[0]
    gp = ((grads.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
    d_loss = D(fake.detach()).mean() - D(real).mean() + 10 * gp
    od.zero_grad(); d_loss.backward(); od.step()
    if it % 2 == 0:
        g_loss = -D(G(torch.randn(32, 16)).reshape(-1, 1, 8, 8)).mean()
        og.zero_grad(); g_loss.backward(); og.step()
    if it % 10 == 0:
        print(f"it {it} d {d_loss.item():.6f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for m in (G, D) for v in m.state_dict().values())))
