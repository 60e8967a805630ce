"""ImageNet WordNet ids -> class words, for prompting on ImageNet-Segmentation.

The ImageNet-Segmentation benchmark (Guillaumin et al. 2014, ``gtsegs_ijcv.mat``) labels each image
with a WordNet noun synset id such as ``"n02105162"``; 445 synsets occur, many outside ILSVRC-1000,
so the bundled table covers all of ImageNet-21k (21,844 ids). ConceptAttention prompts with one short
everyday word per synset ("malinois" -> "dog", "lechwe" -> "animal") rather than the often obscure
lemma, so both are stored.

The table ``imagenet_words.json`` is derived data built by ``scripts/make_imagenet_words.py`` from
WordNet 3.0 and timm's ImageNet-21k synset lists; that script documents how the short words are chosen.

Example:
    >>> imagenet_word("n02105162")
    'dog'
    >>> imagenet_word("n02105162", mode="lemma")
    'malinois'
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from typing import Literal

__all__ = ["imagenet_word", "table_size"]

_TABLE_NAMES = ("imagenet_words.json", "imagenet_words.json.gz")  # the build script gzips it only if large
_EXAMPLE_ID = "n02105162"


@lru_cache(maxsize=1)
def _table() -> dict[str, tuple[str, str]]:
    """Load wnid -> (lemma, short word) once; the file is ~0.8 MB, so it is not read at import time."""
    root = resources.files(__package__)
    for name in _TABLE_NAMES:
        path = root / name
        if path.is_file():
            raw = path.read_bytes()
            if name.endswith(".gz"):
                raw = gzip.decompress(raw)
            words = json.loads(raw)["words"]
            return {wnid: (lemma, short) for wnid, (lemma, short) in words.items()}
    raise FileNotFoundError(
        f"none of {_TABLE_NAMES} found in package {__package__!r}; rebuild with scripts/make_imagenet_words.py"
    )


def imagenet_word(wnid: str, mode: Literal["short", "lemma"] = "short") -> str:
    """Return the word for an ImageNet WordNet id.

    Args:
        wnid: ``"n"`` + the 8-digit WordNet 3.0 noun offset, e.g. ``"n02105162"``.
        mode: ``"short"`` for the short everyday word used as a concept/prompt (``"dog"``);
            ``"lemma"`` for the synset's first WordNet lemma with spaces (``"malinois"``).

    Raises:
        KeyError: ``wnid`` is not an ImageNet-21k synset.
        ValueError: ``mode`` is neither ``"short"`` nor ``"lemma"``.

    Examples:
        >>> imagenet_word("n02123045")
        'cat'
        >>> imagenet_word("n02123394", mode="lemma")
        'Persian cat'
    """
    if mode not in ("short", "lemma"):
        raise ValueError(f"`mode` must be 'short' or 'lemma', got {mode!r}")
    try:
        lemma, short = _table()[wnid]
    except KeyError:
        # Repeat the id and show the expected shape: a common slip is passing a bare offset or a class index.
        raise KeyError(f"unknown WordNet id {wnid!r}; expected an id such as {_EXAMPLE_ID!r}") from None
    return short if mode == "short" else lemma


def table_size() -> int:
    """Number of WordNet ids in the table (all ImageNet-21k synsets).

    Example:
        >>> table_size() > 21000
        True
    """
    return len(_table())
