"""Run detection: which pipeline call (run) and which denoising step a transformer forward belongs to.

A traced pipeline is never modified, so the session learns about calls and steps only from
the forwards it sees and from state the pipeline and its scheduler keep. Three strategies,
by what is available:

* **No pipeline** (a bare transformer, encode mode): every forward is the next step of one
  run; a run starts at :meth:`StepCounter.start_run`.
* **A scheduler with** ``step_index`` (diffusers' flow-matching schedulers): the step is
  ``step_index - begin_index`` (img2img starts at ``begin_index``);
  a new ``scheduler.timesteps`` object marks a new run.
* **A scheduler without** ``step_index`` (DDIM / DPM-style schedulers): the pipeline sets
  ``_current_timestep`` once per step, before that step's forwards, so a new object there marks
  the next step, counted from the first one the run saw (video-to-video starts part-way); a new
  schedule marks a new run; without ``_current_timestep`` every forward is the next step.

A second forward at a step already seen (a separate negative-prompt pass) is reported as a
repeat. Everything is host-side bookkeeping on Python objects: nothing reads a device tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepObservation:
    """Where one forward falls.

    Attributes:
        new_run: the forward starts a new run (a new pipeline call): earlier maps are forgotten.
        step: index of its denoising step within the run, from 0.
        repeat: a forward at this step was already seen (a separate guidance pass).
    """

    new_run: bool
    step: int
    repeat: bool


class StepCounter:
    """Counts runs and steps from the forwards of one traced transformer (see the module docstring).

    Args:
        pipeline: the pipeline whose calls drive the forwards, or None (every forward is the next step).
    """

    def __init__(self, pipeline: Any = None) -> None:
        self.pipeline = pipeline
        self.scheduler = getattr(pipeline, "scheduler", None)
        self._run_token: object = None
        self._steps_seen: set[int] = set()
        self._current: object = None  # the pipeline's `_current_timestep` of the latest step (third strategy)
        self.start_run()

    @property
    def strategy(self) -> str:
        """``"every-forward"``, ``"step-index"`` or ``"current-timestep"``."""
        if self.scheduler is None:
            return "every-forward"
        return "step-index" if hasattr(self.scheduler, "step_index") else "current-timestep"

    @property
    def steps_run(self) -> int:
        """Steps observed in the current run."""
        return len(self._steps_seen)

    def start_run(self) -> None:
        """Begin a new run now (without a scheduler, nothing else tells a new run apart)."""
        self._run_token = object() if self.scheduler is None else None
        self._steps_seen = set()
        self._current = None

    def observe(self) -> StepObservation:
        """Place the forward that is starting now; call once per transformer forward."""
        token, step = self._locate()
        new_run = token is not self._run_token
        if new_run:
            self._run_token = token
            self._steps_seen = set()
            if self.strategy == "current-timestep":
                step = 0
        repeat = step in self._steps_seen
        self._steps_seen.add(step)
        return StepObservation(new_run, step, repeat)

    def _locate(self) -> tuple[object, int]:
        if self.scheduler is None:
            return self._run_token, len(self._steps_seen)
        timesteps = self.scheduler.timesteps
        if self.strategy == "step-index":
            begin = getattr(self.scheduler, "begin_index", None) or 0
            index = self.scheduler.step_index
            return timesteps, 0 if index is None else int(index) - begin
        same_run = timesteps is self._run_token
        current = getattr(self.pipeline, "_current_timestep", None)
        if current is None:
            return timesteps, len(self._steps_seen) if same_run else 0
        if same_run and current is self._current:
            return timesteps, max(self._steps_seen, default=0)  # another forward at this step
        self._current = current
        return timesteps, len(self._steps_seen) if same_run else 0
