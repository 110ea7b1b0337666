"""The optimizer's per-group hyperparameters in the record (run.optimizer_groups), on real runs."""

from __future__ import annotations

import json

import torch
from torch import nn

import gradvitals as gv
from gradvitals.record import Record
from gradvitals.recorder.hyperparams import MAX_ENTRIES_PER_GROUP, group_values


def _train(model, opt, steps, every=5, change=None):
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    with gv.watch(model, opt, every=every, autosave_s=None) as w:
        for step in range(steps):
            if change is not None:
                change(step, opt)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return w.report()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_each_group_of_an_adamw_is_written_once_with_its_values_and_parameters():
    model = _model()
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "eps": 1e-4},
                             {"params": model[2].parameters(), "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    report = _train(model, opt, 12)
    groups = report["run"]["optimizer_groups"]
    assert len(groups) == 2  # unchanged over 12 steps (3 scheduled): written once
    g0, g1 = groups
    assert (g0["optimizer"], g0["group"], g0["kind"], g0["step"]) == ("opt", 0, "AdamW", 0)
    assert g0["eps"] == 1e-4 and g0["betas"] == [0.9, 0.95] and g0["weight_decay"] == 0.1
    assert g1["eps"] == 1e-8 and g1["weight_decay"] == 0.0
    assert g0["params"] == ["0.weight", "0.bias"] and g1["params"] == ["2.weight", "2.bias"]
    # the saved report carries it and a Record read back from it too
    again = Record.from_json(json.loads(json.dumps(report)))
    assert again.run["optimizer_groups"][0]["eps"] == 1e-4


def test_a_changed_group_is_written_again_at_the_next_scheduled_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def change(step, opt):
        if step == 7:
            opt.param_groups[0]["momentum"] = 0.5

    report = _train(model, opt, 12, every=5, change=change)
    groups = report["run"]["optimizer_groups"]
    assert [(g["step"], g["momentum"]) for g in groups] == [(0, 0.9), (10, 0.5)]
    assert "eps" not in groups[0] and groups[0]["kind"] == "SGD"


def test_a_scheduler_moving_betas_every_step_keeps_the_entries_bounded():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def change(step, opt):
        opt.param_groups[0]["betas"] = (0.9 - step * 1e-4, 0.999)

    report = _train(model, opt, 3 * MAX_ENTRIES_PER_GROUP, every=1, change=change)
    groups = report["run"]["optimizer_groups"]
    assert len(groups) == MAX_ENTRIES_PER_GROUP
    last = 3 * MAX_ENTRIES_PER_GROUP - 1
    assert groups[-1]["step"] == last and abs(groups[-1]["betas"][0] - (0.9 - last * 1e-4)) < 1e-12


def test_group_values_are_plain_floats_and_skip_what_is_not_a_number():
    got = group_values({"eps": 1e-8, "betas": (torch.tensor(0.9, dtype=torch.float64), 0.95), "weight_decay": 0,
                        "momentum": "x", "lr": 0.1, "amsgrad": False, "alpha": float("nan")})
    assert got == {"eps": 1e-8, "betas": [0.9, 0.95], "weight_decay": 0.0}
    assert all(type(v) is float for v in [got["eps"], got["weight_decay"], *got["betas"]])
