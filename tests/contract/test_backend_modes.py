"""How a pipeline is run, for every :class:`BackendCase`: the maps do not depend on it.

Gradient checkpointing, inference mode, bfloat16, model CPU offload, prompts of different
lengths in one batch (text masks), every classifier-free guidance mode, repeated calls.
Public API only (``ca.trace``), checked against the naive reference where maps are compared.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cache

import pytest
import torch
from backend_cases import CASES, CASES_BY_NAME, CFG_MODES, BackendCase, CfgMode
from naive_reference import capture_forward_inputs, reference_maps

import conceptattention as ca

PROMPT = "a dog on the grass near a tree"
PROMPTS = ["a dog", "a cat sitting under the big blue sky"]  # different lengths: the short one is padded
CONCEPTS = ["dog", "grass", "sky"]


@pytest.fixture(params=CASES, ids=[case.name for case in CASES])
def case(request) -> BackendCase:
    return request.param


def _run(case: BackendCase, pipe, prompt=PROMPT, **extra):
    args = {**case.run, "output_type": "pt", **extra}
    output = pipe(prompt=prompt, generator=torch.Generator().manual_seed(3), **args)
    return output.frames if case.video else output.images


def _traced(case: BackendCase, pipe, prompt=PROMPT, concepts=CONCEPTS, **extra) -> tuple[ca.ConceptMaps, torch.Tensor]:
    """(maps, output) of one traced call on every block of ``case.layers``, with per-block maps."""
    with ca.trace(pipe, concepts, layers=list(case.layers), per_block=True) as tc:
        output = _run(case, pipe, prompt, **extra)
    maps = tc.maps()
    assert maps.block_maps is not None and maps.block_maps.shape[0] == len(case.layers)
    return maps, output


# -- gradient checkpointing --------------------------------------------------------------------------
@contextmanager
def _checkpointed(transformer):
    """Gradient checkpointing that really runs inside a pipeline call; yields the checkpointed block calls.

    Pipelines run under ``torch.no_grad()`` and diffusers only checkpoints when grad mode is on, so grad
    mode is switched on for each transformer forward (and back after it).
    """
    transformer.enable_gradient_checkpointing()
    checkpoint = transformer._gradient_checkpointing_func
    calls = []

    def counting(block, *args):
        calls.append(block)
        return checkpoint(block, *args)

    transformer._gradient_checkpointing_func = counting
    modes = []

    def enable(module, args, kwargs):
        modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(True)

    def restore(module, args, kwargs, output):
        torch.set_grad_enabled(modes.pop())

    handles = [
        transformer.register_forward_pre_hook(enable, with_kwargs=True),
        transformer.register_forward_hook(restore, with_kwargs=True),
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
        if modes:  # a forward that raised
            torch.set_grad_enabled(modes[0])
        transformer.disable_gradient_checkpointing()


def test_gradient_checkpointing_gives_the_same_maps_and_leaves_the_output_untouched(case):
    """Checkpointed blocks get their arguments by position; the maps and the output do not change."""
    pipe = case.fresh_pipeline()  # checkpointing is switched on and off: not on a cached pipeline
    transformer = pipe.transformer
    grad_mode = torch.is_grad_enabled()
    plain, plain_output = _traced(case, pipe)
    with _checkpointed(transformer) as calls:
        records, untraced = capture_forward_inputs(transformer, lambda: _run(case, pipe))
        untraced_calls = len(calls)
        checkpointed, traced = _traced(case, pipe)
        traced_calls = len(calls) - untraced_calls
        if case.checkpointing_changes_output:
            with ca.trace(pipe, CONCEPTS, layers=list(case.layers), steps=[0]) as tc:
                _run(case, pipe)
            checkpointed_first_step = tc.maps().maps
    assert torch.is_grad_enabled() == grad_mode and not transformer.gradient_checkpointing
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in [transformer, *transformer.modules()])
    # checkpointing really ran: every block of every forward, traced and untraced alike
    forwards = case.run["num_inference_steps"] * case.forwards_per_step
    assert untraced_calls == traced_calls == forwards * len(case.blocks(transformer))
    assert torch.equal(traced, untraced)
    # the concept stream runs outside autograd even in a grad-enabled forward: results carry no graph
    assert not checkpointed.maps.requires_grad and not checkpointed.block_maps.requires_grad
    expected = reference_maps(case.arch, pipe, records[:: case.forwards_per_step], CONCEPTS,
                              layers=list(case.layers), conditional_half=case.conditional_half)  # fmt: skip
    torch.testing.assert_close(checkpointed.maps.flatten(2), expected, rtol=0, atol=1e-5)
    if case.checkpointing_changes_output is None:
        torch.testing.assert_close(checkpointed.maps, plain.maps, rtol=0, atol=1e-6)
        torch.testing.assert_close(checkpointed.block_maps, plain.block_maps, rtol=0, atol=1e-6)
    else:
        # diffusers' checkpointed forward is another computation: the output moves, and with it the later steps'
        # inputs; the first step's inputs are the same, and so are its maps
        assert not torch.equal(untraced, plain_output)
        with ca.trace(pipe, CONCEPTS, layers=list(case.layers), steps=[0]) as tc:
            _run(case, pipe)
        torch.testing.assert_close(checkpointed_first_step, tc.maps().maps, rtol=0, atol=1e-6)


# -- grad modes, dtypes, offloading --------------------------------------------------------------------
def test_inference_mode_gives_the_maps_of_no_grad(case):
    pipe = case.pipeline()
    no_grad, _ = _traced(case, pipe)
    with torch.inference_mode():
        untraced = _run(case, pipe)
        inference, traced = _traced(case, pipe)
    assert torch.equal(traced, untraced)
    torch.testing.assert_close(inference.maps, no_grad.maps, rtol=0, atol=1e-6)
    torch.testing.assert_close(inference.block_maps, no_grad.block_maps, rtol=0, atol=1e-6)


def test_bf16_pipeline_output_is_bit_identical_and_maps_close_to_fp32(case):
    """Two prompts of different lengths: masks (where the model has them) in bfloat16 too."""
    pipe16 = case.fresh_pipeline(torch.bfloat16)
    assert pipe16.transformer.dtype == torch.bfloat16
    plain = _run(case, pipe16, PROMPTS)
    maps16, traced = _traced(case, pipe16, PROMPTS)
    assert torch.equal(plain, traced)
    maps32, _ = _traced(case, case.pipeline(), PROMPTS)
    m16, m32 = maps16.maps, maps32.maps
    assert m16.dtype == torch.float32 and bool(torch.isfinite(m16).all()) and m16.shape == m32.shape
    torch.testing.assert_close(m16.sum(1), torch.ones_like(m16.sum(1)))  # softmax over concepts, then mean
    assert torch.corrcoef(torch.stack([m16.flatten(), m32.flatten()]))[0, 1] > 0.9


def test_model_cpu_offload_gives_the_maps_of_the_plain_pipeline(case):
    """Accelerate's offload hooks on every model (here to the CPU itself), with no_grad and inference mode."""
    pipe = case.fresh_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook")  # offloading is on
    offloaded, _ = _traced(case, pipe)
    with torch.inference_mode():
        offloaded_inference, _ = _traced(case, pipe)
    plain, _ = _traced(case, case.pipeline())
    torch.testing.assert_close(offloaded.maps, plain.maps, rtol=0, atol=1e-6)
    torch.testing.assert_close(offloaded_inference.maps, plain.maps, rtol=0, atol=1e-6)
    torch.testing.assert_close(offloaded.block_maps, plain.block_maps, rtol=0, atol=1e-6)


# -- prompts of different lengths: text masks ------------------------------------------------------------
@cache
def _captured_prompts(name: str):
    """The untraced forwards of one call with two prompts of different lengths, the first forward of each step."""
    case = CASES_BY_NAME[name]
    pipe = case.pipeline()
    records, _ = capture_forward_inputs(pipe.transformer, lambda: _run(case, pipe, PROMPTS))
    return records[:: case.forwards_per_step]


MASKED_VARIANTS = [
    pytest.param({}, ["dog", "grass", "sky"], id="output"),
    pytest.param({"score_space": "value"}, ["dog", "grass", "sky"], id="value"),
    pytest.param({"score_space": "cross_attention"}, ["dog", "grass", "sky"], id="cross-attention"),
    pytest.param({"concept_keys": "image"}, ["dog", "grass", "sky"], id="keys-image"),
    pytest.param({"concept_keys": "concepts"}, ["dog", "grass", "sky"], id="keys-concepts"),
    pytest.param({"softmax": False}, ["dog", "grass", "sky"], id="no-softmax"),
    pytest.param({"pooling": "mean"}, ["skyscraper", "dog"], id="pooling-mean"),
    pytest.param({"pooling": "first"}, ["skyscraper", "dog"], id="pooling-first-multitoken"),
    pytest.param({"layers": [0], "steps": [1]}, ["dog", "sky"], id="layer-0-step-1"),
    pytest.param({}, ["dog"], id="single-concept-minmax"),
]


@pytest.mark.parametrize(("options", "concepts"), MASKED_VARIANTS)
def test_prompts_of_different_lengths_match_the_naive_reference(case, options, concepts):
    pipe = case.pipeline()
    layers = options.get("layers", list(case.layers))
    records = _captured_prompts(case.name)
    expected = reference_maps(case.arch, pipe, records, concepts, **{**options, "layers": layers},
                              conditional_half=case.conditional_half)  # fmt: skip
    with ca.trace(pipe, concepts, **{**options, "layers": layers}) as tc:
        _run(case, pipe, PROMPTS)
    maps = tc.maps()
    assert maps.maps.shape[:2] == (2, len(concepts)) and maps.maps.ndim == (5 if case.video else 4)
    torch.testing.assert_close(maps.maps.flatten(2), expected, rtol=0, atol=1e-5)
    assert maps.metadata["layers"] == layers and maps.metadata["steps"] == options.get("steps", [0, 1])
    assert (maps.maps[0] - maps.maps[1]).abs().max() > 1e-4  # the two prompts' maps differ


def test_the_text_mask_of_prompts_of_different_lengths_matters(case):
    """Where the pipeline masks padded prompt tokens, a reference that ignores the mask does not match the maps."""
    pipe = case.pipeline()
    records = _captured_prompts(case.name)
    blocks = [block for record in records for block in record["blocks"]]
    if case.text_mask is None:  # documented: no mask reaches the blocks, padded prompt tokens are keys
        assert not any(value is not None for block in blocks for key, value in block.items() if "mask" in key)
        return
    for block in blocks:
        mask = block[case.text_mask]
        assert mask is not None and int(mask[0].sum()) < int(mask[1].sum())  # the short prompt is padded, masked
    expected = reference_maps(case.arch, pipe, records, CONCEPTS, layers=list(case.layers),
                              conditional_half=case.conditional_half)  # fmt: skip
    unmasked = [
        {"forward": r["forward"], "blocks": [{**b, case.text_mask: None} for b in r["blocks"]]} for r in records
    ]
    ignored = reference_maps(case.arch, pipe, unmasked, CONCEPTS, layers=list(case.layers),
                             conditional_half=case.conditional_half)  # fmt: skip
    assert (ignored - expected).abs().max() > 1e-3
    maps, _ = _traced(case, pipe, PROMPTS)
    torch.testing.assert_close(maps.maps.flatten(2), expected, rtol=0, atol=1e-5)


# -- classifier-free guidance ------------------------------------------------------------------------------
def test_every_cfg_mode_is_declared_with_its_call_or_the_reason_it_is_absent(case):
    assert set(case.cfg) == set(CFG_MODES)
    for mode in case.cfg.values():
        assert isinstance(mode, CfgMode) or (isinstance(mode, str) and mode)
    assert isinstance(case.cfg["off"], CfgMode)
    # `run` is one of the declared modes: what the contract suite assumes of it
    assert any(
        isinstance(mode, CfgMode)
        and (mode.forwards_per_step, mode.conditional_half) == (case.forwards_per_step, case.conditional_half)
        for mode in case.cfg.values()
    )


CFG_CASES = [
    pytest.param(case, name, id=f"{case.name}-{name}")
    for case in CASES
    for name, mode in case.cfg.items()
    if isinstance(mode, CfgMode)
]


@pytest.mark.parametrize(("case", "mode_name"), CFG_CASES)
def test_cfg_mode_maps_equal_the_reference_on_the_conditional_forward(case, mode_name):
    """Maps describe the first forward of each step (or its conditional half); the negative input is not mapped."""
    mode = case.cfg[mode_name]
    pipe = case.pipeline()
    steps = 3
    extra = {**mode.call, "num_inference_steps": steps}
    records, plain = capture_forward_inputs(pipe.transformer, lambda: _run(case, pipe, **extra))
    assert len(records) == steps * mode.forwards_per_step
    batch = records[0]["forward"]["hidden_states"].shape[0]
    assert batch == (2 if mode.conditional_half else 1)
    conditional = records[:: mode.forwards_per_step]
    layers = list(case.layers)
    expected = reference_maps(case.arch, pipe, conditional, CONCEPTS, layers=layers,
                              conditional_half=mode.conditional_half)  # fmt: skip
    maps, traced = _traced(case, pipe, **extra)
    assert torch.equal(plain, traced)
    assert maps.metadata["num_steps_run"] == steps
    assert maps.maps.shape[0] == 1
    torch.testing.assert_close(maps.maps.flatten(2), expected, rtol=0, atol=1e-5)
    if mode.forwards_per_step == 2:  # the negative forward's own maps differ: it is really ignored
        negative = reference_maps(case.arch, pipe, records[1::2], CONCEPTS, layers=layers)
        assert (negative - expected).abs().max() > 1e-4
    elif mode.conditional_half:
        negative = reference_maps(case.arch, pipe, conditional, CONCEPTS, layers=layers, rows=slice(0, batch // 2))
        assert (negative - expected).abs().max() > 1e-4


def test_maps_follow_the_latest_call(case):
    pipe = case.pipeline()
    only_second, _ = _traced(case, pipe, "a cat")
    with ca.trace(pipe, CONCEPTS, layers=list(case.layers), per_block=True) as both:
        _run(case, pipe, "a dog")
        _run(case, pipe, "a cat")
    torch.testing.assert_close(both.maps().maps, only_second.maps, rtol=0, atol=0)
    torch.testing.assert_close(both.maps().block_maps, only_second.block_maps, rtol=0, atol=0)
    assert both.maps().metadata["num_steps_run"] == case.run["num_inference_steps"]
