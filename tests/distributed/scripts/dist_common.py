"""The model and data shared by the distributed test script and its single-process oracle.

Hidden width 33 makes FSDP2 shard unevenly (17 + 16 rows on 2 ranks).
"""
from __future__ import annotations

import torch
from torch import nn

GLOBAL_BATCH = 32
HIDDEN = 33


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, 10))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


def global_batch(X: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch, the same on every rank (each takes its slice)."""
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, len(X), (GLOBAL_BATCH,), generator=g)
    return X[idx], y[idx]


def rank_slice(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


class TPAttention(nn.Module):
    """Causal multi-head self-attention whose q/k/v are column-parallel and o
    row-parallel under tensor parallelism: each rank holds whole heads, so the head
    count comes from the local width."""

    HEAD_DIM = 8

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        b, s, _ = q.shape
        q, k, v = (t.reshape(b, s, -1, self.HEAD_DIM).transpose(1, 2) for t in (q, k, v))
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class TPTransformer(nn.Module):
    """An embedding, a Pre-LN block (attention, then an MLP with fc1 column- and fc2
    row-parallel), a final LayerNorm and a head: the 4-process tensor-parallel,
    sequence-parallel, FSDP2 x TP and HSDP programs and their one-process oracle."""

    VOCAB, DIM, SEQ = 48, 32, 8
    DEAD = 3
    #: fc1 units biased to fire on few tokens, on each tensor-parallel half of fc1: some
    #: fire on one data-parallel rank's rows of a step and not on the other's.
    RARE = (*range(3, 9), *range(35, 41))
    RARE_BIAS = -1.0

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.VOCAB, self.DIM)
        self.norm1 = nn.LayerNorm(self.DIM)
        self.attn = TPAttention(self.DIM)
        self.norm2 = nn.LayerNorm(self.DIM)
        self.fc1 = nn.Linear(self.DIM, 2 * self.DIM)
        self.fc2 = nn.Linear(2 * self.DIM, self.DIM)
        self.norm3 = nn.LayerNorm(self.DIM)
        self.head = nn.Linear(self.DIM, self.VOCAB)
        with torch.no_grad():  # fc1's first DEAD units never fire: all on the first rank's shard
            self.fc1.bias[:self.DEAD] = -10.0
            self.fc1.bias[list(self.RARE)] = self.RARE_BIAS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(self.norm1(h))
        h = h + self.fc2(torch.relu(self.fc1(self.norm2(h))))
        return self.head(self.norm3(h))


#: The sequence-parallel program's clip_grad_norm_ max_norm: below the gradient norm of
#: each of its steps (0.6-0.9), so every step clips.
SP_CLIP = 0.5


def transformer_batch(step: int, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch of token ids and next-token targets."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, TPTransformer.VOCAB, (batch, TPTransformer.SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]
