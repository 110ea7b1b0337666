# healthy: true
# forbid: update_ratio_high, clipping_always_active, exploding_gradients, nonfinite
"""The classic recipe for LSTM language models (Zaremba et al. 2014, the PyTorch
word_language_model example): plain SGD at a large lr (6) with clip_grad_norm_(max_norm=0.25).
Per-step |dW|/|W| sits around 3e-2..5e-2, thirty times the 1e-3 rule of thumb, and
that is normal here: the loss falls steadily, nothing spikes. A learning rate is
too high when the loss says so, not when the ratio alone is large."""
import random

import torch
import torch.nn as nn

rng = random.Random(0)
words = ["the", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "a", "big", "small"]
text = " ".join(rng.choice(words) for _ in range(3000))
vocab = sorted(set(text))
data = torch.tensor([vocab.index(c) for c in text])

torch.manual_seed(0)
H, T, B = 64, 32, 16


class WordishLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(vocab), 32)
        self.lstm = nn.LSTM(32, H, batch_first=True)
        self.head = nn.Linear(H, len(vocab))

    def forward(self, idx):
        out, _ = self.lstm(self.embed(idx))
        return self.head(out)


model = WordishLSTM()
opt = torch.optim.SGD(model.parameters(), lr=6.0)

for step in range(150):
    starts = torch.randint(0, len(data) - T - 1, (B,))
    x = torch.stack([data[s:s + T] for s in starts])
    y = torch.stack([data[s + 1:s + T + 1] for s in starts])
    loss = nn.functional.cross_entropy(model(x).reshape(-1, len(vocab)), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.25)
    opt.step()
    if step % 30 == 0:
        print(f"step {step} loss {loss.item():.4f}")
