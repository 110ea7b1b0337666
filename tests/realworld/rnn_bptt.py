"""Issue 25: a character-level tanh RNN trained with truncated BPTT over 200 steps,
without gradient clipping, at a learning rate that is too high: the loss climbs
within a few steps (the gradient norm grows by orders of magnitude), then the
script's own perplexity, math.exp(loss), overflows and kills it -- the report is
written after the crash. `--clip 1.0 --lr 0.05` is the healthy twin."""
import argparse
import math

import torch
import torch.nn as nn

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--lr", type=float, default=80.0)
ap.add_argument("--clip", type=float, default=0.0)
args = ap.parse_args()

with open(argparse.__file__, encoding="utf-8") as fh:  # Python's own source: no download
    text = fh.read()[:20000]
vocab = sorted(set(text))
data = torch.tensor([vocab.index(c) for c in text])
torch.manual_seed(0)
H, T, B = 64, 200, 8


class CharRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(len(vocab), 32)
        self.rnn = nn.RNN(32, H, batch_first=True)
        self.head = nn.Linear(H, len(vocab))

    def forward(self, x, h=None):
        out, h = self.rnn(self.emb(x), h)
        return self.head(out), h


model = CharRNN()
opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
gen = torch.Generator().manual_seed(1)
for step in range(args.steps):
    ix = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
    x = torch.stack([data[i:i + T] for i in ix])
    y = torch.stack([data[i + 1:i + T + 1] for i in ix])
    logits, _ = model(x)
    loss = nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    if args.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    print(f"step {step} loss {loss.item():.4f} ppl {math.exp(loss.item()):.4g}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
