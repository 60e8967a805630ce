"""Property-based tests: no input makes the parsers and readers raise anything but the package's error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conceptattention.cli import parse_concepts, parse_indices
from conceptattention.concepts import validate_concepts
from conceptattention.config import ConceptAttentionConfig
from conceptattention.errors import ConceptAttentionError
from conceptattention.images import load_image

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.one_of(st.none(), st.text(), st.lists(st.one_of(st.text(), st.integers(), st.none()), max_size=70)))
def test_concept_lists_validate_or_fail_cleanly(concepts):
    try:
        cleaned = validate_concepts(concepts)
    except ConceptAttentionError:
        return
    assert 1 <= len(cleaned) <= 64 and all(c.strip() == c and c for c in cleaned)
    assert len({c.casefold() for c in cleaned}) == len(cleaned)


@FAST
@given(st.lists(st.text(), max_size=5))
def test_cli_concepts_parse_or_fail_cleanly(values):
    try:
        words = parse_concepts(values)
    except ConceptAttentionError:
        return
    assert words and all(w and "," not in w for w in words)


@FAST
@given(st.one_of(st.none(), st.text(max_size=30)), st.one_of(st.none(), st.text(max_size=30)))
def test_layer_and_step_strings_parse_or_fail_cleanly(layers, steps):
    try:
        config = ConceptAttentionConfig(layers=parse_indices(layers, "layers"), steps=parse_indices(steps, "steps"))
    except ConceptAttentionError:
        return
    for value in (config.layers, config.steps):
        assert value is None or (value == tuple(sorted(set(value))) and all(i >= 0 for i in value))


ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64, np.bool_]),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
)


@FAST
@given(ARRAYS)
def test_image_arrays_convert_or_fail_cleanly(array):
    try:
        image = load_image(array)
    except ConceptAttentionError:
        return
    assert image.mode == "RGB" and np.asarray(image).dtype == np.uint8


@FAST
@given(st.lists(st.binary(max_size=40) | st.builds(lambda v: json.dumps(v).encode(), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)), max_size=8))  # fmt: skip
def test_record_reader_never_crashes_on_stray_lines(tmp_path_factory, lines):
    from conceptattention.eval.harness import read_records

    folder = tmp_path_factory.mktemp("records")
    good = {"key": "m@t=0.5", "id": "a", "method": "m", "t": 0.5, "stats": {}, "blocks": []}
    data = b"\n".join([json.dumps(good).encode(), *[line.replace(b"\n", b" ") for line in lines]]) + b"\n"
    (folder / "records.rank0.jsonl").write_bytes(data)
    records = read_records(folder)
    assert records["m@t=0.5"]["a"] == good


def test_record_field_types_are_checked(tmp_path):
    from conceptattention.eval.harness import read_records

    bad = {"key": 1, "id": "a", "method": "m", "t": 0.5, "stats": {}, "blocks": []}
    (tmp_path / "records.rank0.jsonl").write_text(json.dumps(bad) + "\n")
    assert read_records(tmp_path) == {}
    with pytest.raises(ConceptAttentionError):
        ConceptAttentionConfig(layers="1,2")
