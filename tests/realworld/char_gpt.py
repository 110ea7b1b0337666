"""Issue 25, threshold cases on a small character-level GPT (pre-LN, written out as
people write it), trained on Python's own source text with clip_grad_norm_(max_norm=1.0).

`--lr 1.0 --warmup 60`: AdamW warmed up to a learning rate far too high; after warm-up
the gradient norm sits several times above max_norm on most (not all) steps, so
clip_grad_norm_, not the learning rate, sets the step size.
`--init normal1`: every Linear drawn from N(0, 1) (no 1/sqrt(fan_in)): activations
far above the default's, a step-0 loss far above ln(vocabulary).
The defaults are a healthy run (clipped on a few early steps only)."""
import argparse
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=100)
ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--opt", default="adamw", choices=["adamw", "sgd"])
ap.add_argument("--clip", type=float, default=1.0)
ap.add_argument("--warmup", type=int, default=0, help="ramp the learning rate up from lr/300 over this many steps")
ap.add_argument("--init", default="default", choices=["default", "normal1"])
args = ap.parse_args()

with open(argparse.__file__, encoding="utf-8") as fh:  # Python's own source: no download
    text = fh.read()[:30000]
vocab = sorted(set(text))
data = torch.tensor([vocab.index(c) for c in text])
torch.manual_seed(0)
D, T, B, NH, L = 32, 16, 8, 4, 2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 4 * D)
        self.out = nn.Linear(4 * D, D)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (z.view(b, t, NH, D // NH).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(len(vocab), D)
        self.pos = nn.Embedding(T, D)
        self.blocks = nn.Sequential(*[Block() for _ in range(L)])
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, len(vocab))

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln_f(self.blocks(x)))


model = GPT()
if args.init == "normal1":
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1.0)
if args.opt == "sgd":
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
else:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
sched = (torch.optim.lr_scheduler.LinearLR(opt, 1 / 300, 1.0, args.warmup) if args.warmup > 0 else None)
gen = torch.Generator().manual_seed(1)
norms = []
clipped = 0
for step in range(args.steps):
    ix = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
    x = torch.stack([data[i:i + T] for i in ix])
    y = torch.stack([data[i + 1:i + T + 1] for i in ix])
    loss = F.cross_entropy(model(x).view(-1, len(vocab)), y.view(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    clipped += int(norm.item() > args.clip)
    opt.step()
    if sched is not None:
        sched.step()
    norms.append(round(norm.item(), 2))
    if step % 25 == 0:
        print(f"step {step} loss {loss.item():.4f} grad norm {norm.item():.3g} (ln V = {math.log(len(vocab)):.2f})")
print("norms", norms[::5])
print(f"clipped on {clipped} of {args.steps} steps")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
sys.stdout.flush()
