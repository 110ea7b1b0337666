"""The HTML report's Attention section: drawn from the attention series when recorded,
absent otherwise."""

from __future__ import annotations

import re

from _report_records import mlp_record, report_of

from gradvitals.reports.html import render_html
from gradvitals.reports.html_attention import MAX_LAYERS, attention_html, attention_layers


def with_attention(n_layers: int, steps: int = 5):
    rec = mlp_record(steps=steps)
    for i in range(n_layers):
        for s in range(0, steps):
            rec.add(f"attn_max_logit/h.{i}.attn", s, 2.0 * (i + 1) * 10 ** s)  # grows 10x a step
            rec.add(f"attn_entropy/h.{i}.attn", s, 2.0 / (s + 1))
            rec.add(f"attn_entropy_uniform/h.{i}.attn", s, 2.5)
    return report_of(rec)


def polylines(section: str, chart: int) -> list[str]:
    svgs = re.findall(r"<svg.*?</svg>", section)
    return re.findall(r'points="([^"]+)"', svgs[chart])


def test_section_draws_each_layer_logit_and_entropy_with_its_ceiling():
    page = render_html(with_attention(2))
    section = re.search(r'<section id="attention-section">.*?</section>', page).group(0)
    assert len(polylines(section, 0)) == 2  # one max-logit line per layer
    assert len(polylines(section, 1)) == 4  # entropy + dashed uniform ceiling per layer
    assert section.count('stroke-dasharray') == 2
    # the largest last logit is listed first; a line rising 10x a step on a log axis is straight
    assert attention_layers(with_attention(2)) == ["h.1.attn", "h.0.attn"]
    first = [tuple(map(float, p.split(","))) for p in polylines(section, 0)[0].split()]
    ys = [y for _, y in first]
    steps = [b - a for a, b in zip(ys, ys[1:])]
    assert all(abs(d - steps[0]) < 0.2 for d in steps) and steps[0] < 0  # rising, evenly
    assert "h.1.attn <small>last max logit 4.000e+04" in section


def test_absent_without_attention_series_and_capped_with_many_layers():
    plain = report_of(mlp_record())
    assert attention_html(plain) == "" and 'id="attention-section"' not in render_html(plain)
    many = attention_html(with_attention(MAX_LAYERS + 3))
    assert len(polylines(many, 0)) == MAX_LAYERS and "3 more attention layers" in many
