# healthy: true
# forbid: exploding_gradients, architecture_risk, nonfinite, saturated_activations
"""A character-level LSTM language model with Adam (lr 2e-3) and the chapter's
gradient clipping, `clip_grad_norm_(model.parameters(), max_norm=1.0)`. The LSTM's
gated cell path keeps gradients alive through time; clipping only catches the
occasional spike (early steps), not every step."""
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


class CharLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(vocab), 32)
        self.lstm = nn.LSTM(32, H, batch_first=True)
        self.head = nn.Linear(H, len(vocab))

    def forward(self, idx):
        out, _ = self.lstm(self.embed(idx))
        return self.head(out)


model = CharLSTM()
opt = torch.optim.Adam(model.parameters(), lr=2e-3)

for step in range(120):
    starts = torch.randint(0, len(data) - T - 1, (B,))
    x = torch.stack([data[s:s + T] for s in starts])
    y = torch.stack([data[s + 1:s + T + 1] for s in starts])
    loss = nn.functional.cross_entropy(model(x).reshape(-1, len(vocab)), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    opt.step()
    if step % 30 == 0:
        print(f"step {step} loss {loss.item():.4f}")
