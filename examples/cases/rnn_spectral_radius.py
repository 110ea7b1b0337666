# expect: architecture_risk, exploding_gradients, nonfinite
# forbid: vanishing_gradients, saturated_activations
# origin: oracle
"""A vanilla ReLU RNN language model with IRNN-style identity init of its
recurrent matrix, scaled to 1.5 ("a bit more memory"): spectral radius 1.5. Backprop
through 12 time steps multiplies the gradient by W_hh^T at every step, so it
grows like 1.5^t (130x over 12 steps); each SGD step makes the recurrent weight
larger, so the loss climbs ~100x per step and is NaN by step 5, with nothing
clipping the gradient on the way. The chapter's fix: spectral radius <= 1 (orthogonal init),
an LSTM/GRU, and `clip_grad_norm_(..., max_norm=1.0)`."""
import random

import torch
import torch.nn as nn

rng = random.Random(0)
words = ["the", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "a", "big", "small"]
text = " ".join(rng.choice(words) for _ in range(3000))
vocab = sorted(set(text))
data = torch.tensor([vocab.index(c) for c in text])

torch.manual_seed(0)
H, T, B = 64, 12, 16


class CharRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(vocab), H)
        self.rnn = nn.RNN(H, H, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(H, len(vocab))
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(1.5 * torch.eye(H))

    def forward(self, idx):
        out, _ = self.rnn(self.embed(idx))
        return self.head(out)


model = CharRNN()
opt = torch.optim.SGD(model.parameters(), lr=0.01)

for step in range(20):
    starts = torch.randint(0, len(data) - T - 1, (B,))
    x = torch.stack([data[s:s + T] for s in starts])
    y = torch.stack([data[s + 1:s + T + 1] for s in starts])
    loss = nn.functional.cross_entropy(model(x).reshape(-1, len(vocab)), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 2 == 0:
        print(f"step {step} loss {loss.item():.4g}")
