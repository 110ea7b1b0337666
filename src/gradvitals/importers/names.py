"""Which log key holds which vital sign: the documented name conventions and ``--map``.

A log key is matched, after the user's mapping, case-insensitively once a training
prefix or suffix is removed (``train/``, ``training/``, ``train_``, ``/train``,
``_step``; gradvitals' own TensorBoard prefix ``gradvitals/``):

=====================  =============================================================
quantity               log keys
=====================  =============================================================
``loss``               ``loss`` (HF Trainer, Lightning ``self.log("train_loss")``,
                       ``train/loss``, ``Loss/train``, ``training_loss``)
``grad_norm_global``   ``grad_norm`` (HF Trainer), ``grad_2.0_norm_total`` (Lightning's
                       ``grad_norm()``), ``grad_norm_total``, ``total_grad_norm``,
                       ``global_grad_norm``, ``gradient_norm``, ``grad_norm_global``
``lr``                 ``learning_rate`` (HF), ``lr``, ``lr-<Optimizer>`` (Lightning's
                       ``LearningRateMonitor``: ``lr/<Optimizer>``)
``grad_norm/<param>``  ``grad_2.0_norm/<param>`` (Lightning's ``grad_norm()``),
                       ``grad_norm/<param>``
``<quantity>/<name>``  any quantity of the record's table followed by ``/<name>``
                       (``weight_norm/<param>``, ``update_ratio/<param>``...)
=====================  =============================================================

Keys of evaluation (``eval_``, ``val_``, ``test_``...), per-epoch aggregates
(``_epoch``) and anything else (accuracy, epoch, runtime) are not vital signs: ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from ..record import QUANTITIES, series_key
from .errors import LogError

#: Run-level keys by their normalised name.
RUN_KEYS: dict[str, str] = {
    "loss": "loss",
    "grad_norm": "grad_norm_global",
    "grad_2.0_norm_total": "grad_norm_global",
    "grad_norm_total": "grad_norm_global",
    "total_grad_norm": "grad_norm_global",
    "global_grad_norm": "grad_norm_global",
    "gradient_norm": "grad_norm_global",
    "grad_norm_global": "grad_norm_global",
    "learning_rate": "lr",
    "lr": "lr",
}

#: Prefixes of per-parameter gradient norm keys (Lightning's grad_norm(norm_type=2) writes
#: ``grad_2.0_norm/<param>``), by their normalised spelling.
PARAM_PREFIXES: dict[str, str] = {"grad_2.0_norm": "grad_norm", "grad_norm": "grad_norm"}

_PREFIXES = ("gradvitals/", "train/", "training/", "train_", "training_")
_SUFFIXES = ("/train", "_step")
_NOT_TRAINING = re.compile(r"^(eval|val|valid|validation|test)[_/]|_epoch$|/(eval|val|test)$", re.I)


@dataclass(frozen=True)
class KeyMap:
    """The user's ``--map``: exact keys and ``prefix*`` keys -> series key / quantity."""

    exact: dict[str, str]
    prefixes: tuple[tuple[str, str], ...]


def _target(key: str, target: str) -> str:
    quantity, _, name = target.partition("/")
    q = QUANTITIES.get(quantity)
    if q is None:
        raise LogError("", f"--map {key}={target}: unknown quantity {quantity!r} (known: "
                       f"{', '.join(QUANTITIES)})")
    if q.per != "run" and not name and not key.endswith("*"):
        if quantity == "grad_norm":  # one gradient norm for the whole model: the global one
            return "grad_norm_global"
        raise LogError("", f"--map {key}={target}: {quantity} is recorded per {q.per}: "
                       f"name it, {quantity}/<{q.per}>")
    return target


def parse_mapping(mapping: Mapping[str, str] | list[str] | tuple[str, ...]) -> KeyMap:
    """``{"objective": "loss"}`` or ``["objective=loss", ...]`` (the CLI's ``--map``)."""
    if not isinstance(mapping, Mapping):
        pairs = {}
        for item in mapping:
            key, sep, target = str(item).partition("=")
            if not sep or not key or not target:
                raise LogError("", f"--map {item}: expected LOG_KEY=QUANTITY (e.g. --map objective=loss)")
            pairs[key] = target
        mapping = pairs
    exact: dict[str, str] = {}
    prefixes: list[tuple[str, str]] = []
    for key, target in mapping.items():
        target = _target(key, target)
        if key.endswith("*"):
            prefixes.append((key[:-1], target))
        else:
            exact[key] = target
    return KeyMap(exact, tuple(sorted(prefixes, key=lambda p: -len(p[0]))))


def _normalise(key: str) -> str:
    k = key.strip()
    lower = k.lower()
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if lower.startswith(p) and len(lower) > len(p):
                k, lower, changed = k[len(p):], lower[len(p):], True
        for s in _SUFFIXES:
            if lower.endswith(s) and len(lower) > len(s):
                k, lower, changed = k[: -len(s)], lower[: -len(s)], True
    if lower.startswith("loss/"):  # Loss/train was cut to Loss; Loss/<run> is still a loss
        return "loss"
    return k


def series_for(key: str, mapping: KeyMap) -> str | None:
    """The series key a log key holds, or None when it holds no vital sign."""
    if key in mapping.exact:
        return mapping.exact[key]
    for prefix, target in mapping.prefixes:
        if key.startswith(prefix) and len(key) > len(prefix):
            q = target.partition("/")[0]
            return series_key(q, key[len(prefix):]) if QUANTITIES[q].per != "run" else target
    if _NOT_TRAINING.search(key):
        return None
    k = _normalise(key)
    lower = k.lower()
    if lower in RUN_KEYS:
        return RUN_KEYS[lower]
    if lower.startswith("lr-") and len(k) > 3:  # Lightning's LearningRateMonitor
        return series_key("lr", k[3:])
    head, sep, name = k.partition("/")
    if not sep or not name:
        return None
    head = head.lower()
    if head in PARAM_PREFIXES:
        return series_key(PARAM_PREFIXES[head], name)
    q = QUANTITIES.get(head)
    if q is not None and head != "loss":
        return series_key(head, name)
    return None
