"""Config validation, concept validation and sub-token pooling."""

from __future__ import annotations

import pytest
import torch

from conceptattention import ConceptAttentionConfig, ConceptAttentionError
from conceptattention.concepts import pool_token_states, validate_concepts


def test_config_normalises_and_records():
    cfg = ConceptAttentionConfig(layers=[18, 15, 15], steps=(3, 0))
    assert cfg.layers == (15, 18) and cfg.steps == (0, 3)
    assert cfg.to_dict()["layers"] == [15, 18]
    assert cfg.use_softmax(2) and not cfg.use_softmax(1)
    assert not ConceptAttentionConfig(softmax=False).use_softmax(5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": []}, "`layers` is empty"),
        ({"layers": "1,2"}, "`layers` must be a list"),
        ({"steps": [0.5]}, "`steps` must contain non-negative integers"),
        ({"steps": [True]}, "`steps` must contain non-negative integers"),
        ({"score_space": "post"}, "`score_space` must be one of 'output', 'cross_attention', 'value'"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ConceptAttentionError, match=message):
        ConceptAttentionConfig(**kwargs)


def test_validate_concepts_strips():
    assert validate_concepts([" dog", "sky "]) == ("dog", "sky")
    assert len(validate_concepts([f"w{i}" for i in range(64)])) == 64


def test_pooling_first_and_mean():
    hidden = torch.tensor([[[1.0], [2.0], [9.0]], [[4.0], [6.0], [8.0]]])  # (C=2, S=3, D=1)
    keep = torch.tensor([[True, False, False], [False, True, True]])
    assert pool_token_states(hidden, keep, "first").flatten().tolist() == [1.0, 6.0]
    assert pool_token_states(hidden, keep, "mean").flatten().tolist() == [1.0, 7.0]


class _SpaceSensitiveTokenizer:
    """Ids of a word depend on a leading space, as in sentencepiece/tekken vocabularies."""

    def __call__(self, text, add_special_tokens=False):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids={"dog": [5, 6], " dog": [7]}.get(text, [9]))


def test_a_concept_is_found_as_the_chat_template_tokenized_it():
    from conceptattention.concepts import word_in_context

    tokenizer = _SpaceSensitiveTokenizer()
    assert word_in_context(tokenizer, "dog", [1, 2, 5, 6, 3]) == [5, 6]  # as tokenized alone
    assert word_in_context(tokenizer, "dog", [1, 2, 7, 3]) == [7]  # after a space in the template
    with pytest.raises(ConceptAttentionError, match="does not occur in its templated encoding"):
        word_in_context(tokenizer, "dog", [1, 2, 3])


def test_block_choices_of_both_kinds_are_validated_once():
    config = ConceptAttentionConfig(layers=range(9, 12), single_layers=[5, 3, 3])
    assert config.layers == (9, 10, 11) and config.single_layers == (3, 5)
    assert ConceptAttentionConfig(layers="none", single_layers="all").to_dict()["single_layers"] == "all"
    assert ConceptAttentionConfig().single_layers is None
    with pytest.raises(ConceptAttentionError, match=r"`layers` must be a list of block indices, 'all', 'none' or None"):
        ConceptAttentionConfig(layers="double")
    with pytest.raises(ConceptAttentionError, match=r"`single_layers` is empty: give at least one index, 'none'"):
        ConceptAttentionConfig(single_layers=())
    with pytest.raises(ConceptAttentionError, match=r"`single_layers` must contain non-negative integers"):
        ConceptAttentionConfig(single_layers=[1, -2])


def test_cli_block_notation_reads_words_indices_and_ranges():
    from conceptattention.cli import parse_blocks

    assert parse_blocks(None, "layers") is None
    assert parse_blocks(" all ", "layers") == "all" and parse_blocks("none", "single-layers") == "none"
    assert parse_blocks("0,2,5-7", "layers") == [0, 2, 5, 6, 7]
    assert parse_blocks("3-3,", "single-layers") == [3]
    with pytest.raises(ConceptAttentionError, match=r"`--single-layers`: the range '7-5' is empty"):
        parse_blocks("7-5", "single-layers")
    with pytest.raises(ConceptAttentionError, match=r"`--layers` must be all, none, or comma-separated indices"):
        parse_blocks("1,x", "layers")
