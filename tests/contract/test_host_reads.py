"""A traced forward adds no host read of a tensor (each would stall a GPU once per forward).

Counted with a ``TorchFunctionMode`` inside every transformer forward of a pipeline call, once
untraced and once traced: the trace may add reads only at the first forward of a call, and only
where the token geometry lives in a position-id tensor (``BackendCase.geometry_reads``: Flux.1,
Chroma, Flux.2 read the ids once per call, cached while the pipeline passes the same tensor).
Timesteps stay on the device until the result is built.
"""

from __future__ import annotations

from contextlib import contextmanager, suppress

import pytest
import torch
from backend_cases import CASES, BackendCase
from torch.overrides import TorchFunctionMode

import conceptattention as ca

READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors made while ``inside`` is set, one count per transformer forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.per_forward: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # (`.to(device)` is not counted: on this CPU-only machine every device is the host.)
        if self.inside and getattr(func, "__name__", "") in READS:
            self.per_forward[-1] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counted(transformer):
    """Count host reads inside each forward of ``transformer``, from before its first pre-hook to its end."""
    mode = HostReads()

    def start(module, args):
        if module is transformer:
            mode.per_forward.append(0)
            mode.inside = True

    def stop(module, args, kwargs, output):
        mode.inside = False

    # A global pre-hook runs before every module's own pre-hooks, the session's included (entered before or after).
    handles = [
        torch.nn.modules.module.register_module_forward_pre_hook(start),
        transformer.register_forward_hook(stop, with_kwargs=True, always_call=True),
    ]
    try:
        with mode:
            yield mode
    finally:
        for handle in handles:
            handle.remove()


def _run(case: BackendCase, pipe):
    pipe(prompt=["a dog", "a cat on the grass"], generator=torch.Generator().manual_seed(3),
         **{**case.run, "output_type": "pt"})  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_traced_generation_adds_no_host_reads_after_the_first_forward(case: BackendCase):
    pipe = case.pipeline()
    with counted(pipe.transformer) as plain:
        _run(case, pipe)
    with ca.trace(pipe, ["dog", "grass", "sky"], layers=list(case.layers)) as tc, counted(pipe.transformer) as traced:
        _run(case, pipe)
    assert len(traced.per_forward) == len(plain.per_forward) > 1
    added = [t - p for t, p in zip(traced.per_forward, plain.per_forward)]
    assert 0 <= added[0] <= case.geometry_reads, added
    assert added[1:] == [0] * (len(added) - 1), added
    assert tc.maps().metadata["timesteps"]  # the device timesteps reach the record at the end


@pytest.mark.parametrize("case", [c for c in CASES if c.single_factory], ids=lambda case: case.name)
def test_tracing_single_stream_blocks_adds_no_host_reads_after_the_first_forward(case: BackendCase):
    pipe = case.single_pipeline()
    with counted(pipe.transformer) as plain:
        _run(case, pipe)
    every_block = ca.trace(pipe, ["dog", "grass", "sky"], layers="all", single_layers="all")
    with every_block, counted(pipe.transformer) as traced:
        _run(case, pipe)
    added = [t - p for t, p in zip(traced.per_forward, plain.per_forward)]
    assert len(added) > 1 and 0 <= added[0] <= case.geometry_reads and added[1:] == [0] * (len(added) - 1), added


class _Stop(Exception):
    pass


def _stopped_plain_reads(transformer, forwards: list[dict], last_block: int) -> list[int]:
    """Host reads of untraced forwards with the given kwargs, stopped after ``last_block`` as encode forwards are."""

    def stop(module, args, output):
        raise _Stop

    handle = transformer.transformer_blocks[last_block].register_forward_hook(stop)
    try:
        with counted(transformer) as plain, torch.no_grad():
            for kwargs in forwards:
                with suppress(_Stop):
                    transformer(**kwargs)
    finally:
        handle.remove()
    return plain.per_forward


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_traced_encode_forwards_add_no_host_reads_after_the_first(case: BackendCase):
    pipe = case.pipeline()
    height, width = case.run["height"], case.run["width"]
    shape = (3, height, width) if not case.video else (case.frames, 3, height, width)
    item = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    forwards: list[dict] = []
    keep = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: forwards.append(dict(kw)), with_kwargs=True)
    try:
        with counted(pipe.transformer) as traced:
            if case.video:
                frames = list(item.permute(0, 2, 3, 1).numpy())
                ca.encode_video(pipe, frames, ["dog", "sky"], **case.encode_options, num_samples=3, max_batch=1,
                                height=height, width=width, layers=list(case.layers))  # fmt: skip
            else:
                ca.encode_image(pipe, item, ["dog", "sky"], num_samples=3, max_batch=1, height=height, width=width,
                                layers=list(case.layers))  # fmt: skip
    finally:
        keep.remove()
    assert len(traced.per_forward) == len(forwards) == 3
    plain = _stopped_plain_reads(pipe.transformer, forwards, max(case.layers))
    added = [t - p for t, p in zip(traced.per_forward, plain)]
    assert 0 <= added[0] <= case.geometry_reads, added
    assert added[1:] == [0, 0], added
