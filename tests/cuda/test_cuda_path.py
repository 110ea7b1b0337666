"""The CUDA path on a real GPU: the probes stay on the device, a step makes at most one
synchronising CUDA call (torch's sync debug mode sees every one, hidden ones included), the
recorded values equal torch's, and the watched run's numbers equal the unwatched run's.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine:
``python -m pytest tests/cuda -v``.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradvitals as gv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from overhead import count_cuda_syncs  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda"
STEPS = 60  # scheduled probes at steps 0, 25 and 50 on the default schedule


def _digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32, device=DEV), torch.tensor(y, device=DEV)


def _batches(n: int, size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    X, y = _digits()
    g = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, len(X), (size,), generator=g).to(DEV) for _ in range(n)]
    return [(X[i], y[i]) for i in idx]


def _mlp(depth: int = 20, width: int = 256) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    for m in layers:
        if isinstance(m, nn.Linear):  # He init: the default's is too small for a deep ReLU stack
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def _probe_errors(record) -> list[dict]:
    return record.events_of("probe_error")


def _alarms(report: dict) -> dict[str, str]:
    return {f["code"]: f["summary"] for f in report["findings"] if f["severity"] in ("warning", "critical")}


def test_default_watch_syncs_once_per_step_records_torchs_norms_and_changes_nothing():
    torch.manual_seed(0)
    model = _mlp(depth=8).to(DEV)
    twin = copy.deepcopy(model)
    batches = _batches(STEPS)

    def train(m: nn.Module, opt: torch.optim.Optimizer, syncs: list[list] | None) -> list[torch.Tensor]:
        losses = []
        for x, y in batches:
            if syncs is None:
                loss = F.cross_entropy(m(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                with count_cuda_syncs() as seen:
                    loss = F.cross_entropy(m(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                syncs.append(seen)
            losses.append(loss.detach())
        return losses

    plain_losses = train(twin, torch.optim.Adam(twin.parameters(), lr=1e-3), None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    syncs: list[list] = []
    with gv.watch(model, opt) as w:
        losses = train(model, opt, syncs)
    # Step 0 holds the once-per-model init audit's own fetch; every later step at most one.
    later = [len(s) for s in syncs[1:]]
    assert max(later) <= 1, [(i + 1, s) for i, s in enumerate(syncs[1:]) if len(s) > 1]
    assert sum(later) >= STEPS - 1  # the counter sees the step's one fetch: it can fail
    rec = w.record
    assert not _probe_errors(rec), _probe_errors(rec)
    assert rec.steps == STEPS
    assert rec.series["loss"].values == pytest.approx(torch.stack(losses).tolist(), rel=1e-6)
    total = 0.0
    for name, p in model.named_parameters():  # the last step's gradients are still there
        norm = p.grad.norm().item()
        total += norm * norm
        assert rec.series[f"grad_norm/{name}"].values[-1] == pytest.approx(norm, rel=1e-5), name
    assert rec.series["grad_norm_global"].values[-1] == pytest.approx(math.sqrt(total), rel=1e-5)
    assert rec.run["devices"] == ["cuda:0"]
    # The watched run's numbers are the unwatched run's, bit for bit.
    assert torch.equal(torch.stack(losses), torch.stack(plain_losses))
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    assert not _alarms(w.report())


def test_nan_born_in_a_forward_op_on_the_gpu_names_the_module_and_op():
    class Bad(nn.Module):
        def forward(self, x):
            return torch.log(x - 10.0)  # NaN for every input below 10

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), Bad(), nn.Linear(16, 10)).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gv.watch(model, opt) as w:
        for x, y in _batches(3, 16):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    nonfinite = [f for f in w.report()["findings"] if f["code"] == "nonfinite"]
    assert nonfinite and nonfinite[0]["layers"][0] == "2" and nonfinite[0]["step"] == 0, nonfinite
    assert nonfinite[0]["evidence"]["op"] == "log"
    assert not _probe_errors(w.record), _probe_errors(w.record)


def test_fp16_gradscaler_skipped_steps_are_not_a_nan():
    """The torch.amp recipe on a GPU with the scale started too high (2^24): the first
    float16 backward passes overflow and the scaler skips those steps, by design."""
    torch.manual_seed(0)
    model = _mlp(depth=4, width=128).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 24)
    skipped = 0
    with gv.watch(model, opt) as w:
        for x, y in _batches(30, 64):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.0)
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped += scaler.get_scale() < scale
    report = w.report()
    assert skipped >= 1
    assert report["run"]["steps"] == 30 - skipped
    assert "nonfinite" not in {f["code"] for f in report["findings"]}, report["findings"]
    assert max(w.record.series["loss"].values) < 5  # the loss, not the scaled loss
    assert not _alarms(report)
    assert not _probe_errors(w.record), _probe_errors(w.record)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class _GPT(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 256, heads: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn_blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for blk in self.attn_blocks:
            h = blk(h)
        return self.head(self.norm(h))


def test_bf16_transformer_with_every_probe_on_records_attention_and_log_z_on_the_gpu():
    """full=True (every probe every step), bfloat16 autocast, SDPA's fused kernels: the
    attention and log Z probes measure on the device without an error, and a step still
    syncs once."""
    torch.manual_seed(0)
    model = _GPT().to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(0)
    syncs = []
    with gv.watch(model, opt, full=True) as w:
        for _ in range(6):
            tokens = torch.randint(0, 512, (8, 129), generator=g).to(DEV)
            with count_cuda_syncs() as seen:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(tokens[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, 512), tokens[:, 1:].reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
            syncs.append(len(seen))
    rec = w.record
    assert not _probe_errors(rec), _probe_errors(rec)
    attn = [k for k in rec.series if k.startswith("attn_max_logit/")]
    assert len(attn) == 4, sorted(rec.series)
    for k in attn + ["log_z_max", "log_z_mean"]:
        vals = rec.series[k].values
        assert len(vals) == 6 and all(math.isfinite(v) for v in vals), (k, vals)
    assert rec.series["log_z_max"].values[0] == pytest.approx(math.log(512), rel=0.05)  # near uniform at init
    assert max(syncs[1:]) <= 1, syncs
