"""Concept words -> one text-encoder vector per concept."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from conceptattention.config import Pooling
from conceptattention.errors import ConceptAttentionError

logger = logging.getLogger(__name__)

MAX_CONCEPTS = 64


def validate_concepts(concepts: Sequence[str] | str | None) -> tuple[str, ...]:
    """Check a concept list and return it as a tuple of stripped strings.

    Raises:
        ConceptAttentionError: no concepts, a non-string, a blank or duplicate concept,
            or more than ``MAX_CONCEPTS``.
    """
    if isinstance(concepts, str):
        raise ConceptAttentionError(
            f"`concepts` must be a list of words, got the single string {concepts!r}; "
            f"write concepts=[{concepts!r}] (or split a comma-separated string yourself)"
        )
    if concepts is None or len(concepts) == 0:
        raise ConceptAttentionError('`concepts` is empty: give at least one concept, e.g. concepts=["dog", "sky"]')
    cleaned: list[str] = []
    seen: dict[str, int] = {}
    for i, concept in enumerate(concepts):
        if not isinstance(concept, str):
            raise ConceptAttentionError(f"`concepts[{i}]` must be a string, got {type(concept).__name__} {concept!r}")
        word = concept.strip()
        if not word:
            raise ConceptAttentionError(f"`concepts[{i}]` is blank: every concept needs at least one visible character")
        key = word.casefold()
        if key in seen:
            raise ConceptAttentionError(
                f"`concepts` lists {word!r} twice (positions {seen[key]} and {i}); each concept must be unique"
            )
        seen[key] = i
        cleaned.append(word)
    if len(cleaned) > MAX_CONCEPTS:
        raise ConceptAttentionError(
            f"`concepts` has {len(cleaned)} entries, more than the maximum of {MAX_CONCEPTS}; split them into "
            "several runs"
        )
    return tuple(cleaned)


@dataclass(frozen=True)
class ConceptEmbeddings:
    """Pooled text-encoder states of the concepts, before the transformer's context embedder.

    Attributes:
        states: (C, D_text) one vector per concept, on the encoder's output device and dtype.
        tokens: the sub-tokens of each concept (special tokens removed), for the record.
        pooling: how ``states`` was pooled from the sub-tokens.
        encoder: which prompt encoder produced them, in words (for the record).
        extras: what the backend that encoded them needs besides ``states``, in its own type
            (e.g. :class:`ConceptPositions` for text RoPE at real positions, or whole sequences for a
            context embedder that runs on sequences); None for most backends. Only that backend reads it.
    """

    states: torch.Tensor
    tokens: tuple[tuple[str, ...], ...]
    pooling: Pooling
    encoder: str = ""
    extras: Any = None

    def with_encoder(self, encoder: str) -> ConceptEmbeddings:
        return replace(self, encoder=encoder)


@dataclass(frozen=True)
class ConceptPositions:
    """``ConceptEmbeddings.extras`` of backends that place concepts under text RoPE at their own positions.

    Attributes:
        positions: (C,) text position of each concept's first sub-token in its own encoding (after a
            chat template's header, say), where a one-word prompt's first token would sit.
    """

    positions: tuple[int, ...]


@dataclass(frozen=True)
class CaptionSequences:
    """``ConceptEmbeddings.extras`` of transformers that refine the caption with text-only blocks before their joint
    layers: each concept's whole templated caption, refined on its own, then its span pooled.

    Attributes:
        states: one (L_c, D_text) tensor per concept: the encoder states of its templated caption, padding removed.
        spans: (start, stop) of each concept's own sub-tokens in its caption.
        pooling: how a span is pooled into one vector after the refiner.
    """

    states: tuple[torch.Tensor, ...]
    spans: tuple[tuple[int, int], ...]
    pooling: Pooling

    def to(self, device: torch.device, dtype: torch.dtype) -> CaptionSequences:
        return replace(self, states=tuple(s.to(device, dtype) for s in self.states))

    def refine(
        self, batch_length: Callable[[int], int], refine: Callable[[list[torch.Tensor], int], torch.Tensor]
    ) -> torch.Tensor:
        """(C, D) pooled tokens of the refined captions.

        Captions whose ``batch_length(L_c)`` agree are refined as one batch: ``refine(states, length)`` returns their
        (G, length, D) refined sequences (each caption alone in its rows: no caption sees another).
        """
        groups: dict[int, list[int]] = {}
        for index, states in enumerate(self.states):
            groups.setdefault(batch_length(states.shape[0]), []).append(index)
        pooled: dict[int, torch.Tensor] = {}
        for length, members in groups.items():
            refined = refine([self.states[i] for i in members], length)
            for row, index in enumerate(members):
                start, stop = self.spans[index]
                span = refined[row, start:stop]
                pooled[index] = span[0] if self.pooling == "first" else span.mean(dim=0)
        return torch.stack([pooled[i] for i in range(len(self.states))])


def pipeline_part(pipe: Any, name: str, why: str) -> Any:
    """A pipeline component that concept encoding needs, or an error saying how to load it."""
    part = getattr(pipe, name, None)
    if part is None:
        raise ConceptAttentionError(
            f"{type(pipe).__name__} was loaded without `{name}`, but {why}; load the pipeline with it "
            f"(do not pass `{name}=None` to `from_pretrained`)"
        )
    return part


def check_concept_tokens(concepts: Sequence[str], token_ids: Sequence[Sequence[int]], tokenizer: Any) -> None:
    """Refuse concepts the tokenizer cannot represent, before any compute.

    A concept with a sub-token that is the tokenizer's unknown token (CJK or emoji in a T5
    vocabulary, say), or two concepts with identical token ids, would give maps that do not
    tell those words apart.

    Args:
        concepts: the concept words.
        token_ids: each concept's own token ids (no special tokens).
        tokenizer: the tokenizer that produced them (named in the message).
    """
    name = type(tokenizer).__name__
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is not None:
        bad = [c for c, ids in zip(concepts, token_ids) if unknown in ids]
        if bad:
            raise ConceptAttentionError(
                f"{name} cannot represent concept(s) {bad}: they contain its unknown token "
                f"{getattr(tokenizer, 'unk_token', '')!r}, so their maps would not be theirs; use words in a "
                "script the model's text encoder knows (e.g. English)"
            )
    seen: dict[tuple[int, ...], str] = {}
    for concept, ids in zip(concepts, token_ids):
        key = tuple(ids)
        if key in seen:
            raise ConceptAttentionError(
                f"concepts {seen[key]!r} and {concept!r} encode to the same tokens with {name}, so their maps "
                "would be identical; keep one of them"
            )
        seen[key] = concept


def locate_span(sequence: Sequence[int], word: Sequence[int]) -> int:
    """Start of the first occurrence of the token ids ``word`` in ``sequence``.

    Raises:
        ConceptAttentionError: ``word`` does not occur (e.g. truncated away).
    """
    n = len(word)
    for start in range(len(sequence) - n + 1):
        if list(sequence[start : start + n]) == list(word):
            return start
    raise ConceptAttentionError(
        f"The concept's tokens {list(word)} do not occur in its encoded sequence; the prompt budget "
        "(`max_sequence_length`) may be too small for it"
    )


def concept_token_ids(concepts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Each concept's own token ids (no special tokens), checked before any encoder runs.

    Raises:
        ConceptAttentionError: a concept gives no tokens, contains the unknown token, or two
            concepts give identical ids.
    """
    words = [tokenizer(concept, add_special_tokens=False).input_ids for concept in concepts]
    empty = [c for c, word in zip(concepts, words) if not word]
    if empty:
        raise ConceptAttentionError(f"The tokenizer produced no tokens for concept(s) {empty}; use other words")
    check_concept_tokens(concepts, words, tokenizer)
    return words


def pool_spans(
    hidden: torch.Tensor,
    sequences: Sequence[Sequence[int]],
    words: Sequence[Sequence[int]],
    tokenizer: Any,
    pooling: Pooling,
    encoder: str,
) -> ConceptEmbeddings:
    """Pool each concept's own sub-token states, located by token ids inside its encoded sequence.

    For pipelines whose prompt path pads or wraps the text (templates, fixed lengths): the
    concept's span is found in the sequence the encoder actually saw, not assumed at an index.
    Where each span starts is :func:`span_starts` (for backends that place concepts at text positions).

    Args:
        hidden: (C, S, D) encoder states of each concept's sequence.
        sequences: the token ids behind ``hidden``, one sequence (of length <= S) per concept.
        words: each concept's own token ids (:func:`concept_token_ids`).
        tokenizer: names the sub-tokens for the record.
        pooling: ``"first"`` or ``"mean"`` over the span.
        encoder: the encoding, in words, for the record.
    """
    keep = torch.zeros(hidden.shape[:2], dtype=torch.bool)
    for row, (word, start) in enumerate(zip(words, span_starts(sequences, words))):
        keep[row, start : start + len(word)] = True
    tokens = tuple(tuple(tokenizer.convert_ids_to_tokens(list(word))) for word in words)
    states = pool_token_states(hidden, keep.to(hidden.device), pooling)
    return ConceptEmbeddings(states, tokens, pooling, encoder)


def word_in_context(tokenizer: Any, concept: str, sequence: Sequence[int]) -> list[int]:
    """The concept's token ids as they occur in its templated sequence (alone, else with a leading space).

    Chat templates put the user text after a newline, where BPE vocabularies may or may not merge a leading space
    into the word: both forms are tried, in the sequence the encoder actually saw.
    """
    for text in (concept, " " + concept):
        word = tokenizer(text, add_special_tokens=False).input_ids
        try:
            locate_span(sequence, word)
        except ConceptAttentionError:
            continue
        return word
    raise ConceptAttentionError(
        f"The concept {concept!r} does not occur in its templated encoding with {type(tokenizer).__name__}; "
        "the prompt budget (`max_sequence_length`) may be too small for the chat template"
    )


def span_starts(sequences: Sequence[Sequence[int]], words: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """(C,) index of each concept's first sub-token (``words[c]``) in its encoded sequence (``sequences[c]``)."""
    return tuple(locate_span(sequence, word) for sequence, word in zip(sequences, words))


def pool_token_states(hidden: torch.Tensor, keep: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One vector per sequence from its own sub-token states.

    Args:
        hidden: (C, S, D) encoder states.
        keep: (C, S) bool, True at the concept's own (non-special, non-padding) tokens.
        pooling: ``"first"`` kept token, or ``"mean"`` over kept tokens.

    Returns:
        (C, D) pooled states.
    """
    if pooling == "first":
        first = keep.int().argmax(dim=1)  # (C,) index of the first kept token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    weights = keep.to(hidden.dtype).unsqueeze(-1)  # (C, S, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


@torch.no_grad()
def encode_concepts(
    concepts: Sequence[str], tokenizer, text_encoder, device: torch.device, pooling: Pooling
) -> ConceptEmbeddings:
    """Encode each concept on its own with the prompt text encoder and pool its sub-tokens.

    Concepts are batched with an attention mask, which is equivalent to encoding each alone.

    Args:
        concepts: validated concept words.
        tokenizer: the prompt tokenizer of the encoder (a T5-style encoder-only model).
        text_encoder: a transformers encoder returning ``last_hidden_state``.
        device: where the encoder runs.
        pooling: ``"first"`` or ``"mean"``.
    """
    batch = tokenizer(
        list(concepts),
        padding=True,
        return_tensors="pt",
        return_special_tokens_mask=True,
    )
    keep = batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()  # (C, S)
    empty = [c for c, row in zip(concepts, keep) if not row.any()]
    if empty:
        raise ConceptAttentionError(f"The tokenizer produced no tokens for concept(s) {empty}; use other words")
    check_concept_tokens(concepts, [ids[row].tolist() for ids, row in zip(batch["input_ids"], keep)], tokenizer)
    tokens = tuple(
        tuple(tokenizer.convert_ids_to_tokens(ids[row].tolist())) for ids, row in zip(batch["input_ids"], keep)
    )
    if pooling == "first":
        split = {c: t for c, t in zip(concepts, tokens) if len(t) > 1}
        if split:
            logger.info("pooling='first' keeps only the first sub-token of %s", split)
    hidden = text_encoder(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).last_hidden_state  # (C, S, D_text)
    states = pool_token_states(hidden, keep.to(hidden.device), pooling)  # (C, D_text)
    return ConceptEmbeddings(states=states, tokens=tokens, pooling=pooling)


def encode_t5_concepts(
    pipe: Any, concepts: Sequence[str], pooling: Pooling, tokenizer_name: str, encoder_name: str
) -> ConceptEmbeddings:
    """Concepts through a pipeline's T5 prompt encoder (``pipe.<tokenizer_name>``, ``pipe.<encoder_name>``), each
    concept alone with its attention mask (:func:`encode_concepts`)."""
    why = "concepts are encoded with the T5 prompt encoder"
    tokenizer = pipeline_part(pipe, tokenizer_name, why)
    encoder = pipeline_part(pipe, encoder_name, why)
    embeddings = encode_concepts(concepts, tokenizer, encoder, pipe._execution_device, pooling)
    return embeddings.with_encoder(f"t5 ({encoder_name}), each concept alone with an attention mask")
