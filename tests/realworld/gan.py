"""Pattern 2a: a DCGAN-style loop on 2-D points. Generator and discriminator both
keep their layers in `self.main` (so both have `main.0 ... main.12`), three
backward calls per iteration (D on real, D on fake, G through D), the
generator's gradients into D discarded by `netD.zero_grad()`. The generator's
loss rises while D learns: by design. `--dead-d` adds a bug to D (a layer whose
biases start at -5) so a finding must name `netD:main.<i>`."""
import argparse

import torch
import torch.nn as nn

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--dead-d", action="store_true")
args = ap.parse_args()
torch.manual_seed(0)
NZ, H = 4, 32


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Linear(NZ, H), nn.BatchNorm1d(H), nn.ReLU(True),
            nn.Linear(H, H), nn.BatchNorm1d(H), nn.ReLU(True),
            nn.Linear(H, H), nn.BatchNorm1d(H), nn.ReLU(True),
            nn.Linear(H, H), nn.ReLU(True), nn.Linear(H, 2), nn.Identity())

    def forward(self, z):
        return self.main(z)


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Linear(2, H), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(H, H), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(H, H), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(H, H), nn.ReLU(),
            nn.Linear(H, H), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(H, 1), nn.Identity(), nn.Sigmoid())

    def forward(self, x):
        return self.main(x).view(-1)


netG, netD = Generator(), Discriminator()
if args.dead_d:
    nn.init.constant_(netD.main[6].bias, -5.0)
criterion = nn.BCELoss()
optD = torch.optim.Adam(netD.parameters(), lr=2e-3, betas=(0.5, 0.999))
optG = torch.optim.Adam(netG.parameters(), lr=2e-3, betas=(0.5, 0.999))
B = 64
for it in range(args.steps):
    angle = torch.rand(B) * 6.2832
    real = torch.stack([angle.cos(), angle.sin()], 1) + 0.05 * torch.randn(B, 2)
    # (1) D: maximise log D(x) + log(1 - D(G(z)))
    netD.zero_grad()
    errD_real = criterion(netD(real), torch.ones(B))
    errD_real.backward()
    fake = netG(torch.randn(B, NZ))
    errD_fake = criterion(netD(fake.detach()), torch.zeros(B))
    errD_fake.backward()
    optD.step()
    # (2) G: maximise log D(G(z))
    netG.zero_grad()
    errG = criterion(netD(fake), torch.ones(B))
    errG.backward()
    optG.step()
    if it % 20 == 0:
        print(f"[{it}] Loss_D {(errD_real + errD_fake).item():.5f} Loss_G {errG.item():.5f}")
sd = {**{"G." + k: v for k, v in netG.state_dict().items()}, **{"D." + k: v for k, v in netD.state_dict().items()}}
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in sd.values())))
