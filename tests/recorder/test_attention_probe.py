"""Attention probes: the max attention logit and the mean attention entropy equal a
direct computation (SDPA with causal, padding, additive and GQA masks; a hand-written
softmax), chunking changes nothing, and on a watched forward every attention style is
credited to its module without changing the model's numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradvitals as gv
from gradvitals.probes import attention as probe


def direct(scores: torch.Tensor, keep: torch.Tensor) -> tuple[float, float, float]:
    """max score over kept positions, mean row entropy, mean log(#kept) (rows with a key)."""
    s = scores.double().masked_fill(~keep, -math.inf)
    mx = s.max().item()
    ents, unis = [], []
    for row, k in zip(s.reshape(-1, s.shape[-1]), keep.reshape(-1, keep.shape[-1])):
        if not k.any():
            continue
        p = torch.softmax(row, -1)
        p = p[p > 0]
        ents.append(-(p * p.log()).sum().item())
        unis.append(math.log(int(k.sum())))
    return mx, sum(ents) / len(ents), sum(unis) / len(unis)


def close(st: probe.Stats, ref: tuple[float, float, float]) -> None:
    got = st.values().tolist()
    assert got == pytest.approx(list(ref), rel=1e-5, abs=1e-5)


def qk(B=2, H=4, L=6, S=6, E=8, Hk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, E, generator=g) * 3
    k = torch.randn(B, Hk or H, S, E, generator=g) * 3
    return q, k


def test_sdpa_causal_equals_direct():
    q, k = qk()
    s = q @ k.transpose(-2, -1) / math.sqrt(8)
    keep = torch.ones(6, 6, dtype=torch.bool).tril().expand_as(s)
    close(probe.from_sdpa(q, k, is_causal=True), direct(s, keep))
    # the causal mask matters: without it the max is over more positions
    assert probe.from_sdpa(q, k).values()[0] >= probe.from_sdpa(q, k, is_causal=True).values()[0]
    assert probe.from_sdpa(q, k).values()[2] == pytest.approx(math.log(6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inside_an_autocast_region_the_scores_are_recomputed_in_float32(dtype):
    """The probes run inside the model's forward, so inside its autocast region: the
    recomputed q.kT must not fall back to bf16/fp16 (float32's lowest value, the mask
    fill, overflows them; and the max logit would lose its digits)."""
    q, k = qk()
    s = q @ k.transpose(-2, -1) / math.sqrt(8)
    keep = torch.ones(6, 6, dtype=torch.bool).tril().expand_as(s)
    with torch.autocast("cpu", dtype=dtype):
        st = probe.from_sdpa(q, k, is_causal=True)
        soft = probe.from_softmax(s.masked_fill(~keep, float("-inf")), torch.softmax(s.masked_fill(~keep, float("-inf")), -1))
    close(st, direct(s, keep))
    close(soft, direct(s, keep))


def test_sdpa_padding_mask_scale_and_a_fully_masked_row():
    q, k = qk(L=5, S=7)
    pad = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    pad[0, :, :, 4:] = False  # sequence 0: 3 padded keys
    pad[1, :, 2, :] = False  # a query row with no key at all: no entropy, not counted
    s = q @ k.transpose(-2, -1) * 0.5
    close(probe.from_sdpa(q, k, pad, scale=0.5), direct(s, pad.expand_as(s)))


def test_sdpa_additive_mask_with_finfo_min_counts_as_masked():
    q, k = qk()
    bias = torch.randn(1, 4, 6, 6)  # ALiBi-like bias on every head, plus Hugging Face's padding fill
    bias[..., :, 5] = torch.finfo(torch.float32).min
    s = q @ k.transpose(-2, -1) / math.sqrt(8) + bias
    keep = (bias > -1e30).expand_as(s)
    close(probe.from_sdpa(q, k, bias), direct(s, keep))


def test_sdpa_grouped_query_attention():
    q, k = qk(H=6, Hk=2)
    kk = k.repeat_interleave(3, 1)
    s = q @ kk.transpose(-2, -1) / math.sqrt(8)
    keep = torch.ones(6, 6, dtype=torch.bool).tril().expand_as(s)
    close(probe.from_sdpa(q, k, is_causal=True, enable_gqa=True), direct(s, keep))
    assert probe.from_sdpa(q, k) is None  # torch refuses these shapes without enable_gqa


def test_chunks_over_heads_and_rows_give_the_same_numbers(monkeypatch):
    q, k = qk(H=6, Hk=2, L=9, S=9)
    whole = probe.from_sdpa(q, k, is_causal=True, enable_gqa=True).values()
    monkeypatch.setattr(probe, "CHUNK_NUMEL", 2 * 9 * 9)  # one head per chunk
    heads = probe.from_sdpa(q, k, is_causal=True, enable_gqa=True).values()
    monkeypatch.setattr(probe, "CHUNK_NUMEL", 2 * 9 * 2)  # two query rows per chunk
    rows = probe.from_sdpa(q, k, is_causal=True, enable_gqa=True).values()
    assert torch.allclose(whole, heads, atol=1e-6) and torch.allclose(whole, rows, atol=1e-6)
    x = torch.randn(3, 4, 9, 9).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -math.inf)
    p = torch.softmax(x, -1)
    once = probe.from_softmax(x, p).values()
    assert torch.allclose(once, rows := probe.from_softmax(x, p).values())
    monkeypatch.setattr(probe, "CHUNK_NUMEL", 9 * 5)
    assert torch.allclose(once, probe.from_softmax(x, p).values(), atol=1e-6)


def test_softmax_stats_equal_direct():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 5, generator=g) * 4
    keep = torch.ones(5, 5, dtype=torch.bool).tril().expand_as(x)
    xm = x.masked_fill(~keep, float("-inf"))
    close(probe.from_softmax(xm, torch.softmax(xm, -1)), direct(x, keep))


# ------------------------------------------------------------ watched forwards
D, T, NH = 16, 8, 4


class SdpaAttn(nn.Module):  # nanoGPT's CausalSelfAttention
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(D, 2)
        q, k, v = (z.view(b, t, NH, D // NH).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, D))


class HandAttn(nn.Module):  # minGPT: softmax(QK^T) by hand, mask by masked_fill, nn.Softmax
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D)
        self.sm = nn.Softmax(dim=-1)
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(D, 2)
        q, k, v = (z.view(b, t, NH, D // NH).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D // NH))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = self.sm(att)
        return (att @ v).transpose(1, 2).reshape(b, t, D)


class Net(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.sdpa = SdpaAttn()
        self.hand = HandAttn()
        self.mha = nn.MultiheadAttention(D, NH, batch_first=True)
        self.need_weights = need_weights
        self.head = nn.Linear(D, 5)
        self.cls = nn.Linear(D, 5)

    def forward(self, x):
        x = x + self.sdpa(x)
        x = x + self.hand(x)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        x = x + self.mha(x, x, x, attn_mask=mask, need_weights=self.need_weights)[0]
        # not attention: a softmax over classes (not square, no attention name) must not count
        return self.head(x) + 0.0 * F.softmax(self.cls(x), -1)


def run(need_weights: bool, watch: bool, steps: int = 2):
    torch.manual_seed(0)
    net = Net(need_weights)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(3, T, D, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 5, (3, T), generator=torch.Generator().manual_seed(3))
    out = []

    def loop():
        for _ in range(steps):
            opt.zero_grad()
            logits = net(x)
            loss = F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))
            loss.backward()
            opt.step()
            out.append(logits.detach().clone())

    if watch:
        with gv.watch(net, opt, every=1, autosave_s=None) as w:
            loop()
        return net, out, w.diagnosis()
    loop()
    return net, out, None


@pytest.fixture(scope="module", params=[True, False], ids=["mha_weights", "mha_sdpa"])
def watched(request):
    return request.param, run(request.param, True), run(request.param, False)


def test_every_attention_style_is_recorded_per_module(watched):
    _, (_, _, report), _ = watched
    series = report.record.series
    names = sorted(k.split("/", 1)[1] for k in series if k.startswith("attn_max_logit/"))
    assert names == ["hand", "mha", "sdpa"], names
    for n in names:
        steps, vals = series[f"attn_max_logit/{n}"].points()
        assert steps == [0, 1]
        _, ent = series[f"attn_entropy/{n}"].points()
        _, uni = series[f"attn_entropy_uniform/{n}"].points()
        # causal rows over 8 keys: mean log(#keys) = mean(log 1..8)
        assert uni[0] == pytest.approx(sum(math.log(i) for i in range(1, T + 1)) / T, rel=1e-5)
        assert 0 <= ent[0] <= uni[0] + 1e-5


def test_the_recorded_first_step_equals_torch_on_the_same_weights(watched):
    """The oracle: the scores recomputed here from the initial weights (seed 0) and input."""
    _, (_, _, report), _ = watched
    torch.manual_seed(0)
    net = Net(True)
    x = torch.randn(3, T, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        q, k, _ = net.sdpa.c_attn(x).split(D, 2)
        q, k = (z.view(3, T, NH, D // NH).transpose(1, 2) for z in (q, k))
        s = q @ k.transpose(-2, -1) / math.sqrt(D // NH)
    keep = torch.ones(T, T, dtype=torch.bool).tril().expand_as(s)
    mx, ent, _ = direct(s, keep)
    rec = report.record.series
    assert rec["attn_max_logit/sdpa"].points()[1][0] == pytest.approx(mx, rel=1e-5)
    assert rec["attn_entropy/sdpa"].points()[1][0] == pytest.approx(ent, rel=1e-5)


def test_watching_changes_no_number_and_leaves_torch_unpatched(watched):
    _, (net_w, out_w, _), (net_p, out_p, _) = watched
    for a, b in zip(out_w, out_p):
        assert torch.equal(a, b)
    for (n, p), (_, p2) in zip(net_w.named_parameters(), net_p.named_parameters()):
        assert torch.equal(p, p2), n
    assert not hasattr(F.scaled_dot_product_attention, "__wrapped__")
    assert not hasattr(F.softmax, "__wrapped__") and not hasattr(torch.softmax, "__wrapped__")
    assert "softmax" not in vars(torch.Tensor)


def test_unscheduled_steps_record_no_attention():
    torch.manual_seed(0)
    net = Net(False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(3, T, D)
    with gv.watch(net, opt, every=2, autosave_s=None) as w:
        for _ in range(3):
            opt.zero_grad()
            net(x).sum().backward()
            opt.step()
            if _ == 0:  # between traced forwards torch's own functions are in place
                assert not hasattr(F.scaled_dot_product_attention, "__wrapped__")
    assert w.record.series["attn_max_logit/sdpa"].points()[0] == [0, 2]


def test_hugging_face_gpt2_sdpa_and_eager_record_the_same_numbers_per_attention_block():
    """HF GPT-2 from its config (no download), padded batch: ``sdpa`` goes through
    scaled_dot_product_attention with HF's mask, ``eager`` through its own softmax."""
    transformers = pytest.importorskip("transformers")
    got = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=16,
                                      bos_token_id=0, eos_token_id=0, attn_implementation=impl)
        model = transformers.GPT2LMHeadModel(cfg)
        assert model.config._attn_implementation == impl
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 10:] = 0
        with gv.watch(model, opt, every=1, autosave_s=None) as w:
            opt.zero_grad()
            model(x, attention_mask=mask, labels=x).loss.backward()
            opt.step()
        got[impl] = {k: s.points()[1][0] for k, s in w.record.series.items() if k.startswith("attn_")}
    assert sorted({k.split("/")[1] for k in got["sdpa"]}) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert got["sdpa"].keys() == got["eager"].keys()
    for k, v in got["sdpa"].items():
        assert v == pytest.approx(got["eager"][k], rel=1e-4, abs=1e-5), k
    # padding: the second sequence's 6 padded keys are masked, so the ceiling is below the causal one
    causal = sum(math.log(i) for i in range(1, 17)) / 16
    assert got["sdpa"]["attn_entropy_uniform/transformer.h.0.attn"] < causal - 0.01


def test_the_probes_add_no_host_sync():
    """Every step traced (every=1): all three attention styles measured, still <= 1 sync
    per step (+1 at step 0: the init audit), counted by the benchmark's counter."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from overhead import count_host_syncs

    torch.manual_seed(0)
    net = Net(True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(3, T, D)
    per_step = []
    with gv.watch(net, opt, every=1, autosave_s=None) as w, count_host_syncs() as counter:
        for _ in range(3):
            before = counter["n"]
            opt.zero_grad()
            net(x).sum().backward()
            opt.step()
            per_step.append(counter["n"] - before)
    assert per_step[0] <= 2 and max(per_step[1:]) <= 1, per_step
    assert len(w.record.series["attn_entropy/mha"].points()[0]) == 3
