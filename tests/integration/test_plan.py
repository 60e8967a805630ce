"""One plan per call: each entry point reads the model's defaults, resolves the layers and validates the concept
encoder once, and refuses the wrong modality with one message format."""

from __future__ import annotations

import pytest
import torch
from backend_cases import CASES_BY_NAME

import conceptattention as ca
import conceptattention.plan as plan_module
from conceptattention.plan import call_plan, model_plan


@pytest.fixture
def counted(monkeypatch):
    """Counts of ``conceptattention.json`` reads, layer resolutions and concept-encoder validations."""
    counts = {"defaults": 0, "layers": 0, "encoder": 0}
    pipe = CASES_BY_NAME["flux"].pipeline()
    backend = model_plan(pipe).backend
    read_defaults = plan_module.model_defaults
    resolve, choose = type(backend).resolve_layers, type(backend).concept_encoder

    def count(key, function):
        def wrapped(*args, **kwargs):
            counts[key] += 1
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(plan_module, "model_defaults", count("defaults", read_defaults))
    monkeypatch.setattr(type(backend), "resolve_layers", count("layers", resolve))
    monkeypatch.setattr(type(backend), "concept_encoder", count("encoder", choose))
    return pipe, counts


def test_encode_image_resolves_everything_once(counted):
    pipe, counts = counted
    ca.encode_image(pipe, torch.rand(3, 32, 48), ["dog", "sky"], height=32, width=48, layers=[1, 2])
    assert counts == {"defaults": 1, "layers": 1, "encoder": 1}


def test_generate_and_trace_resolve_everything_once(counted):
    pipe, counts = counted
    ca.generate(pipe, "a dog", ["dog", "sky"], height=32, width=48, num_inference_steps=1, max_sequence_length=16)
    assert counts == {"defaults": 1, "layers": 1, "encoder": 1}
    counts.update(defaults=0, layers=0, encoder=0)
    with ca.trace(pipe, ["dog", "sky"]):
        pipe("a dog", height=32, width=48, num_inference_steps=1, max_sequence_length=16, output_type="pt")
    assert counts == {"defaults": 1, "layers": 1, "encoder": 1}


def test_a_call_plan_is_frozen_and_carries_the_resolved_choices():
    pipe = CASES_BY_NAME["sd3"].pipeline()
    plan = call_plan(pipe, [" dog ", "sky"], ca.ConceptAttentionConfig(concept_encoder="clip"))
    assert plan.concepts == ("dog", "sky") and plan.concept_encoder == "clip"
    assert plan.blocks.double == plan.model.backend.default_layers(pipe.transformer) == (1, 2)  # later half
    assert plan.blocks.single == () and plan.blocks.labels == ["double 1", "double 2"]
    assert plan.concept_encoding().encoder == "clip"
    with pytest.raises(AttributeError):
        plan.blocks = None  # type: ignore[misc]


def test_the_modality_check_has_one_message_format():
    video = model_plan(CASES_BY_NAME["cogvideox"].pipeline())
    with pytest.raises(ca.ConceptAttentionError) as refused:
        video.require("image", "The web app shows image models", "map videos with the CLI")
    assert str(refused.value) == (
        "The web app shows image models, and CogVideoXPipeline is a video model (CogVideoX); map videos with the CLI"
    )
    model_plan(CASES_BY_NAME["flux"].pipeline()).require("image", "unused", "unused")  # no error


def test_a_pipeline_without_a_transformer_is_refused_by_the_plan():
    class NotAPipeline:
        pass

    with pytest.raises(ca.ConceptAttentionError, match="NotAPipeline has no `transformer`"):
        model_plan(NotAPipeline())
