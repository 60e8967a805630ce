"""What an eval folder was computed with, and who is writing it: results never go stale or mix.

``manifest.json`` records every setting that changes a record (dataset and its size/limit,
model identity, dtype, protocol without t, layers, seed, per-block, package version). A run
into a folder whose manifest differs is refused, naming the differing settings; adding
methods or timesteps with everything else equal is allowed (they are new records).
``eval.lock`` holds the process that writes the folder (one per launch: its main process).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from conceptattention.adapters.base import BlockSelection
from conceptattention.config import ConceptAttentionConfig
from conceptattention.errors import ConceptAttentionError
from conceptattention.eval.config import EvalConfig
from conceptattention.eval.protocol import blocks_used

MANIFEST = "manifest.json"
LOCK = "eval.lock"
RESULT_FILES = ("records.rank*.jsonl", "report.md", "report.csv", "per_block.png", MANIFEST)


def model_identity(model: str | None, pipe: Any) -> dict[str, Any]:
    """Model name plus a fingerprint of its transformer: config and weight file sizes (or parameter count)."""
    transformer = pipe.transformer
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    name = str(getattr(pipe.config, "_name_or_path", None) or model or "bundled")
    folder = Path(name) / "transformer"
    if folder.is_dir():
        weights = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
    else:
        weights = [("parameters", sum(p.numel() for p in transformer.parameters()))]
    digest = hashlib.sha256(json.dumps([config, weights], sort_keys=True, default=str).encode()).hexdigest()
    return {"name": name, "transformer": type(transformer).__name__, "fingerprint": digest[:16]}


def build_manifest(
    config: EvalConfig, *, dataset_size: int, model: dict[str, Any], dtype: str, blocks: BlockSelection
) -> dict[str, Any]:
    """The settings of ``config`` that change a record: the one list a resumed run must match.

    Not listed, so free to differ between runs into one folder: ``methods`` and ``t_values`` (new
    records), ``batch_size`` (results do not depend on it), ``out``, ``data`` (the dataset is
    identified by name and size), ``overwrite``; ``model`` and ``dtype`` count as what they load
    (``model``: :func:`model_identity`; ``dtype``: the transformer's), and the blocks as resolved
    (``single_layers`` only when single-stream blocks are scored, so folders of earlier runs still resume).
    """
    settings = {
        "dataset": config.dataset,
        "dataset_size": dataset_size,
        "limit": config.limit,
        "words": config.dataset_options().get("words"),
        "model": model,
        "dtype": dtype,
        "protocol": {k: v for k, v in config.protocol().to_dict().items() if k != "t"},  # t: per run
        "layers": list(blocks.double),
        "seed": config.seed,
        "per_block": config.per_block,
    }
    if blocks.single:
        settings["single_layers"] = list(blocks.single)
    try:
        version = importlib_metadata.version("conceptattention")
    except importlib_metadata.PackageNotFoundError:
        version = None
    return json.loads(json.dumps({**settings, "package_version": version}, default=str))


def manifest_of(config: EvalConfig, pipe: Any, dataset_size: int, model: Any = None) -> dict[str, Any]:
    """:func:`build_manifest` for ``config`` run on ``pipe`` (its identity, dtype and resolved layers).

    Args:
        model: the run's :class:`~conceptattention.plan.ModelPlan` of ``pipe`` (made here when not given).
    """
    return build_manifest(
        config,
        dataset_size=dataset_size,
        model=model_identity(config.model, pipe),
        dtype=str(pipe.transformer.dtype).replace("torch.", ""),
        blocks=blocks_used(
            model or pipe, ConceptAttentionConfig(layers=config.layers, single_layers=config.single_layers)
        ),
    )


def check_or_write(out: Path, manifest: dict[str, Any], overwrite: bool, write: bool = True) -> None:
    """Refuse a folder computed with other settings; with ``overwrite`` remove its results first.

    With ``write=False`` only the check is made (the other processes of a multi-process launch).
    """
    path = out / MANIFEST
    if overwrite:
        for pattern in RESULT_FILES:
            for old in out.glob(pattern):
                old.unlink()
    elif path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            previous = {"manifest": "unreadable"}
        differing = [
            f"{key} ({json.dumps(previous.get(key))} there, {json.dumps(manifest.get(key))} now)"
            for key in sorted(set(previous) | set(manifest))
            if previous.get(key) != manifest.get(key)
        ]
        if differing:
            raise ConceptAttentionError(
                f"{out} holds results computed with other settings: {'; '.join(differing)}. Use a new `--out`, "
                "or `--overwrite` to delete those results and start over."
            )
        return
    if not write:
        if any(out.glob("records.rank*.jsonl")):
            raise ConceptAttentionError(
                f"{out} holds records without a {MANIFEST}, so their settings are unknown. Use a new `--out`, "
                "or `--overwrite` to delete them and start over."
            )
        return
    elif any(out.glob("records.rank*.jsonl")):
        raise ConceptAttentionError(
            f"{out} holds records without a {MANIFEST}, so their settings are unknown. Use a new `--out`, "
            "or `--overwrite` to delete them and start over."
        )
    out.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    temporary.replace(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """``eval.lock`` in the folder while a run writes it; a second run is refused and told who holds it.

    A lock left by a process that no longer runs (on this host) is taken over.
    """

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK
        self.held = False

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                with self.path.open("x") as handle:
                    json.dump(me, handle)
                self.held = True
                return self
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                    holder = {}
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(
                    holder["pid"]
                ):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise ConceptAttentionError(
                    f"{self.path.parent} is being written by another eval (process {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, since {holder.get('since', '?')}); wait for it, or use another "
                    f"`--out`. If no such process runs, delete {self.path}."
                ) from None
        raise ConceptAttentionError(f"could not take {self.path}; delete it if no eval is running")

    def __exit__(self, *exc_info: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
