"""The backend seam: a backend is a Backend value (spec + parts), never a subclass, and its parts check themselves."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conceptattention.adapters import BACKEND_MODULES, registry
from conceptattention.adapters.base import Backend, LayerRule, VideoFacts, last_blocks, later_half
from conceptattention.adapters.joint import FluxStyleProcessor, JointPath
from conceptattention.errors import ConceptAttentionError


def test_every_registered_backend_is_a_plain_backend_value():
    backends = set(map(id, registry().values()))
    assert len(backends) == len(BACKEND_MODULES)  # one value per backend module
    for backend in registry().values():
        assert type(backend) is Backend  # composed, not a subclass
        assert dataclasses.is_dataclass(backend)
        with pytest.raises(dataclasses.FrozenInstanceError):
            backend.spec = backend.spec  # type: ignore[misc]
        assert (backend.video is not None) == (backend.spec.modality == "video")


def test_layer_rules_on_hand_computed_cases():
    assert later_half([0, 1, 2, 3, 4]) == (2, 3, 4)
    assert later_half([0, 2, 3]) == (2, 3)
    assert last_blocks(3)([0, 1, 2, 3, 4]) == (2, 3, 4)
    assert last_blocks(10)([4, 5]) == (4, 5)  # fewer than asked: all of them


def test_a_joint_path_takes_exactly_one_kind_of_conditioning():
    def per_forward(transformer, record, dtype):
        return torch.zeros(1)

    def per_block(record, arguments):
        return torch.zeros(1)

    with pytest.raises(TypeError, match="exactly one"):
        JointPath(FluxStyleProcessor)
    with pytest.raises(TypeError, match="exactly one"):
        JointPath(FluxStyleProcessor, forward_conditioning=per_forward, block_conditioning=per_block)
    assert JointPath(FluxStyleProcessor, block_conditioning=per_block).forward_conditioning is None


def test_frame_facts_are_given_exactly_for_video_models():
    flux = registry()["FluxTransformer2DModel"]
    cogvideox = registry()["CogVideoXTransformer3DModel"]
    with pytest.raises(TypeError, match="video models"):
        dataclasses.replace(flux, video=cogvideox.video)
    with pytest.raises(TypeError, match="video models"):
        dataclasses.replace(cogvideox, video=None)
    with pytest.raises(ConceptAttentionError, match="is an image model"):
        flux.frames  # noqa: B018
    assert isinstance(cogvideox.frames, VideoFacts)


def test_a_layer_rule_drives_resolution_and_its_errors():
    flux = registry()["FluxTransformer2DModel"]

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(6))

    model = Blocks()
    rule = LayerRule(default=later_half, excluded=lambda transformer, blocks: {len(blocks) - 1: "it is dead"})
    backend = dataclasses.replace(flux, layers=rule)
    assert backend.usable_blocks(model) == [0, 1, 2, 3, 4]
    assert backend.resolve_layers(model, None) == (2, 3, 4)
    with pytest.raises(ConceptAttentionError, match=r"contains 5, which cannot be used: it is dead\. Choose among 0-4"):
        backend.resolve_layers(model, [4, 5])
    with pytest.raises(ConceptAttentionError, match="has 6 double-stream blocks"):
        backend.resolve_layers(model, [6])


def test_blocks_of_both_kinds_resolve_to_run_indices_double_first():
    flux = registry()["FluxTransformer2DModel"]

    class Blocks(torch.nn.Module):
        def __init__(self, double: int, single: int):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(double))
            self.single_transformer_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(single))

    model = Blocks(6, 3)
    rule = LayerRule(default=later_half, excluded=lambda transformer, blocks: {len(blocks) - 1: "it is dead"})
    backend = dataclasses.replace(flux, layers=rule)
    default = backend.resolve_blocks(model, None)
    assert (default.double, default.single, default.run_indices) == ((2, 3, 4), (), (2, 3, 4))
    both = backend.resolve_blocks(model, [1, 4], [0, 2])
    assert both.run_indices == (1, 4, 6, 8) and both.labels == ["double 1", "double 4", "single 0", "single 2"]
    assert [both.kind_of(i) for i in both.run_indices] == [("double", 1), ("double", 4), ("single", 0), ("single", 2)]
    assert backend.resolve_blocks(model, "all", "all").run_indices == (0, 1, 2, 3, 4, 6, 7, 8)  # 5 is dead
    assert backend.resolve_blocks(model, "none", "all").run_indices == (6, 7, 8)
    assert backend.resolve_blocks(model, None, "none").single == ()
    with pytest.raises(ConceptAttentionError, match=r"`single_layers` contains 3, but Blocks has 3 single-stream "
                       r"blocks \(valid indices: 0-2\)"):  # fmt: skip
        backend.resolve_blocks(model, None, [3])
    with pytest.raises(ConceptAttentionError, match=r"`layers='none'` leaves no block to score"):
        backend.resolve_blocks(model, "none", None)
    with pytest.raises(ConceptAttentionError, match=r"no single-stream blocks \(this model was built with "
                       r"`num_single_layers=0`\)"):  # fmt: skip
        backend.resolve_blocks(Blocks(6, 0), None, [0])

