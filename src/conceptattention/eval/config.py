"""Every setting of one evaluation run, in one typed object built once (by the CLI, training or a test)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from conceptattention.config import BlockChoice, ConceptAttentionConfig
from conceptattention.errors import ConceptAttentionError
from conceptattention.eval.protocol import METHODS, PROTOCOLS, EvalProtocol

WORDS = ("short", "lemma")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What ``conceptattention eval`` runs: dataset, model, methods, protocol overrides, sharding-free settings.

    Attributes:
        dataset: a :data:`~conceptattention.eval.protocol.PROTOCOLS` name ("imagenet-seg", "voc-single",
            "voc-multi", "scenes"); it selects the protocol.
        data: the downloaded dataset files (not for scenes).
        model: hub id or local folder; None: the bundled model.
        out: the results folder (records, manifest, report).
        methods: :data:`~conceptattention.eval.protocol.METHODS` names.
        t_values: noise levels; one row per (method, t).
        num_samples, resolution, blur: protocol overrides (None: the dataset's protocol); ``resolution``
            is the side of a square model input.
        per_block: also score every selected block.
        layers: double-stream block indices, ``"all"`` or ``"none"``; None: the model's default.
        single_layers: single-stream block indices, ``"all"`` or ``"none"``; None: the model's default (none).
        seed: base of the per-image noise seeds.
        limit: only the first ``limit`` images.
        batch_size: forwards (image x draw rows) per transformer call; results do not depend on it. None:
            encode mode's default (:func:`conceptattention.encode.default_rows`: from free GPU memory, 4 on CPU).
        words: ImageNet class words, "short" (paper) or "lemma" (WordNet).
        dtype: model dtype; None: the model's default.
        overwrite: delete results computed with other settings in ``out``.
    """

    dataset: str
    data: Path | None = None
    model: str | None = None
    out: Path = Path("outputs/eval")
    methods: tuple[str, ...] = ("concept_attention",)
    t_values: tuple[float, ...] = (0.5,)
    num_samples: int | None = None
    resolution: int | None = None
    blur: bool | None = None
    per_block: bool = False
    layers: BlockChoice = None
    single_layers: BlockChoice = None
    seed: int = 0
    limit: int | None = None
    batch_size: int | None = None
    words: Literal["short", "lemma"] = "short"
    dtype: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("methods", "t_values", "layers", "single_layers"):  # lists become tuples (hashable, frozen)
            value = getattr(self, name)
            if value is not None and not isinstance(value, (tuple, str)):
                object.__setattr__(self, name, tuple(value))
        if self.words not in WORDS:
            raise ConceptAttentionError(f"`--words` must be short or lemma, got {self.words!r}")
        if self.dataset not in PROTOCOLS:
            raise ConceptAttentionError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(PROTOCOLS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConceptAttentionError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")

    def protocol(self) -> EvalProtocol:
        """The dataset's protocol with this run's overrides (its ``t`` is replaced per run by ``t_values``)."""
        overrides: dict[str, Any] = {
            "num_samples": self.num_samples,
            "blur": self.blur,
            "resolution": (self.resolution, self.resolution) if self.resolution else None,
        }
        return dataclasses.replace(PROTOCOLS[self.dataset], **{k: v for k, v in overrides.items() if v is not None})

    def dataset_options(self) -> dict[str, Any]:
        """Keyword options of the dataset's loader (ImageNet-Seg: the class words)."""
        return {"words": self.words} if self.dataset == "imagenet-seg" else {}

    def open_dataset(self) -> Any:
        """The dataset named by ``dataset`` read from ``data``."""
        from conceptattention.eval.datasets import open_dataset

        return open_dataset(self.dataset, self.data, **self.dataset_options())

    def method_config(self, method: str) -> ConceptAttentionConfig:
        """The variant ``method`` evaluates, with this run's layers and per-block setting."""
        return dataclasses.replace(
            METHODS[method], per_block=self.per_block, layers=self.layers, single_layers=self.single_layers
        )
