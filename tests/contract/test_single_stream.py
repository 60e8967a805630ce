"""Single-stream ConceptAttention, for every backend that traces single-stream blocks.

Each runs on its tiny model with two double- and two single-stream blocks: streams untouched
(bit-identical), maps equal to the naive reference in every score space and key set, per-block
maps in run order (double, then single), encode mode stopping after the last used block of
either kind, and one clear error per kind of bad block selection.
"""

from __future__ import annotations

import pytest
import torch
from backend_cases import CASES, CASES_BY_NAME, BackendCase
from naive_reference import capture_forward_inputs, reference_maps
from test_backend_contract import _capture_block_outputs, _encode, _run, _sample
from test_backend_modes import _checkpointed

import conceptattention as ca
from conceptattention.adapters import backend_for

SINGLE_CASES = [case for case in CASES if case.single_factory is not None]
CONCEPTS = ["dog", "grass", "tree"]


@pytest.fixture(params=SINGLE_CASES, ids=[case.name for case in SINGLE_CASES])
def case(request) -> BackendCase:
    return request.param


def _all_blocks(pipe) -> list:
    return list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)


def test_every_stream_stays_bit_identical_with_single_blocks_traced(case):
    pipe = case.single_pipeline()
    records, handles = _capture_block_outputs(_all_blocks(pipe))
    try:
        plain = _run(case, pipe, ["a dog", "a cat under the sky"])
        plain_blocks = list(records)
        records.clear()
        with ca.trace(pipe, CONCEPTS, layers="all", single_layers="all") as tc:
            traced = _run(case, pipe, ["a dog", "a cat under the sky"])
        traced_blocks = list(records)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(plain, traced)
    assert len(plain_blocks) == len(traced_blocks) == case.run["num_inference_steps"] * case.forwards_per_step * 4
    for a, b in zip(plain_blocks, traced_blocks):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert tc.maps().metadata["blocks"] == ["double 0", "double 1", "single 0", "single 1"]


VARIANTS = [
    pytest.param({"layers": "all", "single_layers": "all"}, CONCEPTS, id="all"),
    pytest.param({"layers": "none", "single_layers": "all"}, CONCEPTS, id="single-only"),
    pytest.param({"layers": "none", "single_layers": [1]}, CONCEPTS, id="last-single-only"),
    pytest.param({"layers": [0], "single_layers": [1], "concept_keys": "image"}, CONCEPTS, id="keys-image"),
    pytest.param({"layers": "none", "single_layers": [0], "concept_keys": "concepts"}, CONCEPTS, id="keys-concepts"),
    pytest.param({"layers": "none", "single_layers": "all", "softmax": False}, CONCEPTS, id="no-softmax"),
    pytest.param(
        {"layers": "none", "single_layers": "all", "score_space": "cross_attention"}, CONCEPTS, id="cross-attention"
    ),
    pytest.param({"layers": [1], "single_layers": "all", "score_space": "value"}, ["dog", "sky"], id="value"),
    pytest.param({"layers": "none", "single_layers": [1]}, ["dog"], id="single-concept-minmax"),
]


def _indices(choice) -> list[int]:
    """The blocks a choice selects on the tiny models (two of each kind)."""
    return {"all": [0, 1], "none": []}[choice] if isinstance(choice, str) else list(choice)


@pytest.mark.parametrize(("options", "concepts"), VARIANTS)
def test_single_block_maps_match_naive_reference(case, options, concepts):
    pipe = case.single_pipeline()
    records, _ = capture_forward_inputs(pipe.transformer, lambda: _run(case, pipe))
    records = records[:: case.forwards_per_step]  # the first forward of each step (not a negative pass)
    double, single = (_indices(options[name]) for name in ("layers", "single_layers"))
    expected, expected_blocks = reference_maps(
        case.arch, pipe, records, concepts, **{**options, "layers": double, "single_layers": single},
        conditional_half=case.conditional_half, per_block=True,
    )  # fmt: skip
    with ca.trace(pipe, concepts, per_block=True, **options) as tc:
        _run(case, pipe)
    maps = tc.maps()
    got = maps.maps.flatten(2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert got.std() > 1e-3  # not trivially constant
    assert maps.metadata["layers"] == double and maps.metadata["single_layers"] == single
    assert maps.metadata["blocks"] == [f"double {i}" for i in double] + [f"single {j}" for j in single]
    assert maps.block_maps is not None
    block_maps = maps.block_maps.flatten(-2 if not case.video else -3)  # (L, B, C, N)
    if len(concepts) > 1:  # per-block maps are the per-block means (min-max scaling applies to one concept only)
        torch.testing.assert_close(block_maps, expected_blocks, rtol=0, atol=1e-5)


def test_gradient_checkpointed_single_blocks_match_the_reference_and_leave_the_output_untouched(case):
    """Checkpointed blocks of both kinds get their arguments by position."""
    assert case.single_factory is not None
    pipe = case.single_factory()  # checkpointing is switched on and off: not on a cached pipeline
    with _checkpointed(pipe.transformer) as calls:
        records, untraced = capture_forward_inputs(pipe.transformer, lambda: _run(case, pipe))
        with ca.trace(pipe, CONCEPTS, layers="all", single_layers="all") as tc:
            traced = _run(case, pipe)
    assert len(calls) == 2 * case.run["num_inference_steps"] * case.forwards_per_step * 4  # every block, both runs
    assert torch.equal(traced, untraced)
    expected = reference_maps(case.arch, pipe, records[:: case.forwards_per_step], CONCEPTS, layers=[0, 1],
                              single_layers=[0, 1], conditional_half=case.conditional_half)  # fmt: skip
    torch.testing.assert_close(tc.maps().maps.flatten(2), expected, rtol=0, atol=1e-5)


def test_single_blocks_change_the_maps_and_double_only_stays_the_paper_default(case):
    pipe = case.single_pipeline()
    with ca.trace(pipe, CONCEPTS) as default:
        _run(case, pipe)
    paper = list(backend_for(pipe.transformer).default_layers(pipe.transformer))  # double-stream blocks only
    with ca.trace(pipe, CONCEPTS, layers=paper) as double:
        _run(case, pipe)
    with ca.trace(pipe, CONCEPTS, layers=paper, single_layers=[0]) as both:
        _run(case, pipe)
    meta = default.maps().metadata
    assert meta["single_layers"] == [] and meta["num_single_blocks"] == 2 and meta["num_double_blocks"] == 2
    torch.testing.assert_close(default.maps().maps, double.maps().maps, rtol=0, atol=0)
    assert (both.maps().maps - double.maps().maps).abs().max() > 1e-3


def test_observers_see_the_concept_tokens_of_both_kinds_in_run_order(case):
    pipe = case.single_pipeline()
    seen: list[tuple[str, int]] = []
    with ca.trace(pipe, CONCEPTS, layers=[0], single_layers=[1]) as tc:
        tc.on_block(lambda record: seen.append((record.kind, record.block)))
        _run(case, pipe)
    steps = case.run["num_inference_steps"]
    assert seen == [("double", 0), ("double", 1), ("single", 0), ("single", 1)] * steps


def test_encode_stops_after_the_last_selected_block_of_either_kind(case):
    pipe = case.single_pipeline()
    calls: list[str] = []
    blocks = [("double", b) for b in pipe.transformer.transformer_blocks]
    blocks += [("single", b) for b in pipe.transformer.single_transformer_blocks]
    handles = [
        b.register_forward_pre_hook(lambda m, a, label=f"{kind} {i % 2}": calls.append(label))
        for i, (kind, b) in enumerate(blocks)
    ]
    try:
        _encode(case, pipe, _sample(case, 32, 32), ["dog", "sky"], height=32, width=32, layers="none",
                single_layers=[0])  # fmt: skip
        first = list(calls)
        calls.clear()
        _encode(case, pipe, _sample(case, 32, 32), ["dog", "sky"], height=32, width=32, layers=[0])
    finally:
        for h in handles:
            h.remove()
    assert first == ["double 0", "double 1", "single 0"]
    assert calls == ["double 0"]


def test_bad_block_selections_get_one_clear_message_each(case):
    pipe = case.single_pipeline()
    name = type(pipe.transformer).__name__
    with pytest.raises(ca.ConceptAttentionError, match=rf"`single_layers` contains 2, but {name} has 2 single-stream "
                       r"blocks \(valid indices: 0-1\)"):  # fmt: skip
        ca.trace(pipe, CONCEPTS, single_layers=[1, 2])
    with pytest.raises(ca.ConceptAttentionError, match=r"`layers` contains 5, but .* has 2 double-stream blocks"):
        ca.trace(pipe, CONCEPTS, layers=[5], single_layers="all")
    with pytest.raises(ca.ConceptAttentionError, match=r"`layers='none'` leaves no block to score: select blocks "
                       r"with `layers` or `single_layers`"):  # fmt: skip
        ca.trace(pipe, CONCEPTS, layers="none")
    with pytest.raises(ca.ConceptAttentionError, match=r"`single_layers` must be a list of block indices, 'all', "
                       r"'none' or None \(the default\), got 'every'"):  # fmt: skip
        ca.trace(pipe, CONCEPTS, single_layers="every")
    with pytest.raises(ca.ConceptAttentionError, match=r"`single_layers` is empty: give at least one index, 'none'"):
        ca.trace(pipe, CONCEPTS, single_layers=[])


def test_single_blocks_on_models_without_them_are_refused():
    sd3 = CASES_BY_NAME["sd3"].pipeline()
    with pytest.raises(ca.ConceptAttentionError, match=r"`single_layers` was given, but SD3Transformer2DModel has no "
                       r"single-stream blocks \(SD3 is dual-stream throughout\); select dual-stream "
                       r"blocks with `layers`"):  # fmt: skip
        ca.trace(sd3, CONCEPTS, single_layers=[0])
    from tiny_flux import make_tiny_flux_pipeline

    flux = make_tiny_flux_pipeline(seed=0, num_layers=2, num_single_layers=0)
    with pytest.raises(ca.ConceptAttentionError, match=r"FluxTransformer2DModel has no single-stream blocks \(this "
                       r"model was built with `num_single_layers=0`\)"):  # fmt: skip
        ca.trace(flux, CONCEPTS, single_layers="all")
    assert ca.trace(sd3, CONCEPTS, single_layers="none").plan.blocks.single == ()


def test_a_custom_processor_on_a_traced_single_block_is_refused_and_left_in_place(case):
    pipe = case.single_pipeline()
    transformer = pipe.transformer
    name = f"single_transformer_blocks.1.{case.attention}.processor"
    before = dict(transformer.attn_processors)

    class Custom:
        def __call__(self, *args, **kwargs):
            return before[name](*args, **kwargs)

    custom = Custom()
    transformer.set_attn_processor({**before, name: custom})
    try:
        message = rf"`{name}` is a Custom; ConceptAttention replaces only"
        refused = pytest.raises(ca.ConceptAttentionError, match=message)
        with refused, ca.trace(pipe, CONCEPTS, single_layers=[1]):
            pass
        assert transformer.attn_processors[name] is custom
        assert all(transformer.attn_processors[k] is v for k, v in before.items() if k != name)
        with ca.trace(pipe, CONCEPTS, single_layers=[0]):  # block 1 is not traced: its processor is not touched
            pass
    finally:
        transformer.set_attn_processor(before)
