"""EvalConfig: one typed settings object; the manifest built from it differs exactly where the settings do."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conceptattention.adapters.base import BlockSelection
from conceptattention.core import SegmentationCounts
from conceptattention.errors import ConceptAttentionError
from conceptattention.eval.config import EvalConfig
from conceptattention.eval.manifest import build_manifest
from conceptattention.eval.protocol import METHODS, PROTOCOLS, EvalProtocol


def test_config_is_frozen_and_takes_lists_as_tuples():
    config = EvalConfig(dataset="scenes", methods=["cross_attention"], t_values=[0.3, 0.7], layers=[1])
    assert config.methods == ("cross_attention",) and config.t_values == (0.3, 0.7) and config.layers == (1,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3
    with pytest.raises(TypeError):
        EvalConfig("scenes")  # keywords only
    assert hash(config) == hash(dataclasses.replace(config))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dataset": "coco"}, "unknown dataset 'coco'; choose one of imagenet-seg, voc-single, voc-multi, scenes"),
        ({"dataset": "scenes", "methods": ("gradcam",)}, "unknown method(s) ['gradcam']; choose from"),
        ({"dataset": "imagenet-seg", "words": "wordnet"}, "`--words` must be short or lemma, got 'wordnet'"),
    ],
)
def test_config_refuses_unknown_names(options, message):
    with pytest.raises(ConceptAttentionError) as error:
        EvalConfig(**options)
    assert message in str(error.value)


def test_protocol_overrides_and_the_registered_protocols():
    paper = EvalProtocol(num_samples=5, blur=True, gt_size=(224, 224), image_via_gt_size=True)
    assert PROTOCOLS["imagenet-seg"] == dataclasses.replace(
        paper, background_concepts=("background", "floor", "tree", "person", "grass", "face")
    )
    assert (
        PROTOCOLS["voc-single"]
        == PROTOCOLS["voc-multi"]
        == dataclasses.replace(paper, background_concepts=("background", "floor", "grass", "tree", "sky"))
    )
    assert PROTOCOLS["scenes"] == EvalProtocol(caption="a photo of {classes}", t=0.5, num_samples=1, blur=False)
    with pytest.raises(TypeError):
        EvalProtocol((), "a {classes}")  # keywords only
    assert EvalConfig(dataset="voc-multi").protocol() == PROTOCOLS["voc-multi"]
    changed = EvalConfig(dataset="voc-multi", num_samples=2, blur=False, resolution=64).protocol()
    assert changed == dataclasses.replace(PROTOCOLS["voc-multi"], num_samples=2, blur=False, resolution=(64, 64))
    assert EvalConfig(dataset="imagenet-seg", words="lemma").dataset_options() == {"words": "lemma"}
    assert EvalConfig(dataset="voc-single", words="lemma").dataset_options() == {}


def test_method_config_keeps_the_method_and_takes_layers_and_per_block():
    config = EvalConfig(dataset="scenes", layers=(0, 1), per_block=True)
    method = config.method_config("cross_attention")
    assert method == dataclasses.replace(METHODS["cross_attention"], layers=(0, 1), per_block=True)


def test_method_config_takes_single_stream_blocks_and_the_manifest_records_them_only_when_scored():
    config = EvalConfig(dataset="scenes", layers="none", single_layers=[1, 0])
    assert config.method_config("concept_attention").layers == "none"
    assert config.method_config("concept_attention").single_layers == (0, 1)
    settings = {"dataset_size": 6, "model": {"name": "m"}, "dtype": "float32"}
    double = build_manifest(EvalConfig(dataset="scenes"), **settings, blocks=BlockSelection((2, 3), (), 4))
    both = build_manifest(config, **settings, blocks=BlockSelection((), (0, 1), 4))
    assert double["layers"] == [2, 3] and "single_layers" not in double  # earlier folders still resume
    assert both["layers"] == [] and both["single_layers"] == [0, 1]
    with pytest.raises(ConceptAttentionError, match="no block is selected"):
        BlockSelection((), (), 4)


def test_manifest_of_an_imagenet_run_records_the_words_and_its_layout():
    settings = {"dataset_size": 6, "model": {"name": "m"}, "dtype": "float32", "blocks": BlockSelection((0, 1), ())}
    short = build_manifest(EvalConfig(dataset="imagenet-seg"), **settings)
    lemma = build_manifest(EvalConfig(dataset="imagenet-seg", words="lemma"), **settings)
    assert {k for k in short if short[k] != lemma[k]} == {"words"}
    assert sorted(short) == ["dataset", "dataset_size", "dtype", "layers", "limit", "model", "package_version",
                             "per_block", "protocol", "seed", "words"]  # fmt: skip
    assert "t" not in short["protocol"] and short["protocol"]["gt_size"] == [224, 224]


def test_segmentation_counts_round_trip_through_sparse_rows():
    g = torch.Generator().manual_seed(0)
    counts = SegmentationCounts(4, ignore_index=255)
    counts.update(torch.randint(0, 4, (6, 7), generator=g), torch.randint(0, 3, (6, 7), generator=g))
    rows = counts.sparse()
    assert all(n > 0 for _, _, n in rows) and sum(n for _, _, n in rows) == 42
    assert torch.equal(SegmentationCounts.from_sparse(rows, 4).confmat, counts.confmat)
