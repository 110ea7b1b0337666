"""Shared pieces of the integration tests: the broken script's model, tiny trainers.

A plain module, not a conftest.py: a second ``conftest`` would shadow tests/conftest.py
for the ``from conftest import ...`` lines of other test modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parent / "scripts"
BROKEN_SCRIPT = SCRIPTS / "broken_mlp.py"


def load_broken() -> ModuleType:
    """The plain script, imported as a module (its training runs only as __main__)."""
    name = "gradvitals_tests_broken_mlp"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BROKEN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def problems(report) -> list[tuple[str, str]]:
    return [(f.code, f.severity) for f in report.findings if f.severity in ("critical", "warning")]


def lightning_trainer(tmp_path: Path, callback, **kwargs):
    """A quiet CPU Trainer: no progress bar, checkpoints, model summary or sanity check."""
    import lightning as L

    defaults = dict(accelerator="cpu", devices=1, max_epochs=1000, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, logger=False,
                    num_sanity_val_steps=0, default_root_dir=str(tmp_path), callbacks=[callback])
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def hf_args(tmp_path: Path, **kwargs):
    from transformers import TrainingArguments

    defaults = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                    disable_tqdm=True, dataloader_num_workers=0, logging_steps=1, seed=0)
    defaults.update(kwargs)
    return TrainingArguments(**defaults)
