"""The step clock: which optimizer step of the run is open.

One optimizer: each of its steps is a step. Several (a GAN's two players): a step
ends with the optimizer that closes their cycle, learned from the order they step
in. None: each backward is a step (the backward mode, see Recorder.backward_end).
A closure optimizer (LBFGS) is measured at its closure's first backward.
"""

from __future__ import annotations

from typing import Any, Callable


class StepClock:
    def __init__(self, on_advance: Callable[[int], None]) -> None:
        self.on_advance = on_advance  # called with the new step number
        self.step = 0
        self.stepped: list[int] = []  # optimizers stepped in the current step, in order (their id)
        self.cycle_last: int | None = None  # the optimizer that ends a step (learned)
        self.optimizer_seen = False
        self.pre_hook_calls = 0
        self.last_stepped_call = 0  # pre_hook_calls when the open step's last optimizer stepped
        self.scaler_pre_calls = 0  # pre_hook_calls when GradScaler.step began
        self.closure_step: Any = None  # a closure optimizer's step awaiting its first backward
        self.closure_measured = False  # that step is measured: later (line-search) losses are not the step's

    def advance(self) -> None:
        self.stepped = []
        self.step += 1
        self.on_advance(self.step)

    def step_begins(self) -> None:
        """An optimizer is about to step."""
        self.optimizer_seen = True
        self.pre_hook_calls += 1

    def cycle_begins(self, key: int) -> None:
        """Before measuring: a new cycle began if ``key`` stepped already in this one."""
        if key in self.stepped:  # a new cycle began before we learned its end
            if self.cycle_last is None and self.stepped:
                self.cycle_last = self.stepped[-1]
            self.advance()

    def took(self, key: int) -> None:
        self.stepped.append(key)
        self.last_stepped_call = self.pre_hook_calls

    def step_ends(self, key: int, live: set[int], single: bool) -> None:
        """Optimizer ``key`` stepped (``live``: the ids of the optimizers still alive)."""
        if single or self.cycle_last == key:
            self.advance()
        elif self.cycle_last is None and set(self.stepped) >= live:
            # every optimizer has stepped once: this one ends the step (else a clip
            # or a loss of the next step would be recorded one step too early)
            self.cycle_last = key
            self.advance()

    def forget(self, alive: set[int]) -> None:
        """Optimizers were dropped (garbage-collected): they leave the cycle."""
        self.stepped = [k for k in self.stepped if k in alive]
        if self.cycle_last not in alive:
            self.cycle_last = None

    def segment_starts(self, registered_at: int) -> None:
        """A new segment's optimizer steps for the first time. Created after the open
        step's optimizers stepped: that step (the previous segment's last; its optimizer
        is alive, so the cycle never saw it end) is over. (One created before them steps
        within their step: a model joining.)"""
        if self.stepped and registered_at >= self.last_stepped_call:
            self.advance()
            self.cycle_last = None

    def taken(self, recorded_now: bool) -> int:
        """Steps taken so far: a step still open (several optimizers, one of them alive
        but idle: the cycle never saw the last step end) counts once it was recorded."""
        return self.step + 1 if self.stepped and recorded_now else self.step
