"""Run detection (StepCounter): one test per scheduler kind, on fake pipelines that behave as diffusers' do."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from conceptattention.steps import StepCounter


def _walk(counter: StepCounter, forwards) -> list[tuple[bool, int, bool]]:
    """Observe each forward after ``forwards`` yields (the pipeline's state is set for it)."""
    seen = []
    for _ in forwards:
        where = counter.observe()
        seen.append((where.new_run, where.step, where.repeat))
    return seen


def test_without_a_pipeline_every_forward_is_the_next_step_of_one_run():
    counter = StepCounter(None)
    assert counter.strategy == "every-forward"
    assert _walk(counter, range(3)) == [(False, 0, False), (False, 1, False), (False, 2, False)]
    counter.start_run()
    assert _walk(counter, range(2)) == [(False, 0, False), (False, 1, False)]
    assert counter.steps_run == 2


def _step_index_pipeline(num_steps: int, begin: int = 0):
    scheduler = SimpleNamespace(timesteps=None, step_index=None, begin_index=begin)
    return SimpleNamespace(scheduler=scheduler)


def _call_with_step_index(pipe, num_steps: int, forwards_per_step: int, begin: int = 0):
    """As a flow-matching pipeline: a new timesteps tensor per call; step_index None at the first forward."""
    pipe.scheduler.timesteps = torch.linspace(1000, 0, num_steps + begin)
    pipe.scheduler.begin_index = begin
    for step in range(num_steps):
        pipe.scheduler.step_index = None if step == 0 else begin + step  # set by the first step() call
        for _ in range(forwards_per_step):
            yield


def test_step_index_schedulers_count_from_begin_index_and_see_repeats_and_new_calls():
    pipe = _step_index_pipeline(3)
    counter = StepCounter(pipe)
    assert counter.strategy == "step-index"
    first = _walk(counter, _call_with_step_index(pipe, 3, forwards_per_step=2))
    assert first == [(True, 0, False), (False, 0, True), (False, 1, False), (False, 1, True), (False, 2, False),
                     (False, 2, True)]  # fmt: skip
    assert counter.steps_run == 3
    # img2img with strength: the schedule starts at begin_index; steps still count from 0
    second = _walk(counter, _call_with_step_index(pipe, 2, forwards_per_step=1, begin=4))
    assert second == [(True, 0, False), (False, 1, False)]
    assert counter.steps_run == 2


def _call_with_current_timestep(pipe, num_steps: int, forwards_per_step: int, skip: int = 0):
    """As CogVideoX's DDIM/DPM pipelines: ``_current_timestep = t`` once per step, ``t`` iterated from the schedule."""
    pipe.scheduler.timesteps = torch.arange(999, -1, -1000 // (num_steps + skip))[: num_steps + skip]
    for t in pipe.scheduler.timesteps[skip:]:
        pipe._current_timestep = t
        for _ in range(forwards_per_step):
            yield
    pipe._current_timestep = None


def test_schedulers_without_step_index_count_steps_by_the_pipelines_current_timestep():
    pipe = SimpleNamespace(scheduler=SimpleNamespace(timesteps=None), _current_timestep=None)
    counter = StepCounter(pipe)
    assert counter.strategy == "current-timestep"
    seen = _walk(counter, _call_with_current_timestep(pipe, 3, forwards_per_step=2))
    assert seen == [(True, 0, False), (False, 0, True), (False, 1, False), (False, 1, True), (False, 2, False),
                    (False, 2, True)]  # fmt: skip
    # video-to-video starts part-way through the schedule: steps count from the first one run
    seen = _walk(counter, _call_with_current_timestep(pipe, 2, forwards_per_step=1, skip=2))
    assert seen == [(True, 0, False), (False, 1, False)]


def test_equal_timestep_values_at_different_steps_are_different_steps():
    # identity, not value, marks a step: two steps at the same numeric timestep stay two steps
    pipe = SimpleNamespace(scheduler=SimpleNamespace(timesteps=torch.tensor([500, 500])), _current_timestep=None)
    counter = StepCounter(pipe)
    steps = []
    for t in pipe.scheduler.timesteps:
        pipe._current_timestep = t
        steps.append(counter.observe().step)
    assert steps == [0, 1]


def test_without_current_timestep_every_forward_is_the_next_step_of_the_schedule():
    pipe = SimpleNamespace(scheduler=SimpleNamespace(timesteps=torch.tensor([900, 500])))
    counter = StepCounter(pipe)
    assert _walk(counter, range(3)) == [(True, 0, False), (False, 1, False), (False, 2, False)]
    pipe.scheduler.timesteps = torch.tensor([900, 500])  # a new call
    assert _walk(counter, range(1)) == [(True, 0, False)]


def test_observing_reads_no_tensor_on_the_host():
    from torch.overrides import TorchFunctionMode

    reads = []

    class HostReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in {"item", "tolist", "__bool__", "__int__", "__float__", "cpu"}:
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    pipe = SimpleNamespace(scheduler=SimpleNamespace(timesteps=None), _current_timestep=None)
    counter = StepCounter(pipe)
    calls = _call_with_current_timestep(pipe, 3, forwards_per_step=2)
    next(calls)
    with HostReads():
        counter.observe()
    for _ in calls:
        with HostReads():
            counter.observe()
    assert reads == []
