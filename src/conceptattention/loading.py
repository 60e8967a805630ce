"""Loading pipelines from a hub id or a local folder, with errors that say what to do."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from conceptattention.adapters import backend_for
from conceptattention.errors import ConceptAttentionError, WeightsNotFoundError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULTS_FILE = "conceptattention.json"
BUNDLED_NAMES = (None, "bundled", "conceptattention/bundled")


def bundled_model_path() -> Path:
    """Folder of the bundled model shipped inside the package."""
    return Path(__file__).resolve().parent / "bundled" / "model"


def model_defaults(pipe: Any) -> dict[str, Any]:
    """Recommended call defaults stored beside a model (``conceptattention.json``), if any.

    The bundled model records its training resolution and caption length here, since
    FluxPipeline's own defaults (1024 px, 512 tokens) are those of FLUX.1.
    """
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not name:
        return {}
    path = Path(str(name)) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``torch.bfloat16`` / None -> torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConceptAttentionError(f"`dtype` must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _default_dtype(model: str | Path, dtype: str | torch.dtype | None, device: Any) -> torch.dtype:
    """The requested dtype; else the model's recorded one; else bf16 on CUDA and fp32 elsewhere.

    One dtype for every component: left alone, diffusers and transformers pick different
    defaults for the transformer and the text encoders, and the pipeline then fails.
    """
    if dtype is not None:
        return resolve_dtype(dtype)  # type: ignore[return-value]
    defaults_file = Path(model).expanduser() / DEFAULTS_FILE
    if defaults_file.is_file():
        recorded = json.loads(defaults_file.read_text()).get("torch_dtype")
        if recorded:
            return resolve_dtype(recorded)  # type: ignore[return-value]
    return torch.bfloat16 if str(device or "").startswith("cuda") else torch.float32


# Seconds per connect / read of one hub request, so a silent network fails instead of hanging.
HUB_TIMEOUT_S = float(os.environ.get("CONCEPTATTENTION_HUB_TIMEOUT", "30"))


def bound_hub_requests(timeout: float = HUB_TIMEOUT_S) -> None:
    """Give huggingface_hub's HTTP clients finite timeouts (its default client waits forever)."""
    try:
        import huggingface_hub
        from huggingface_hub.utils import _http
    except ImportError:  # pragma: no cover - older huggingface_hub without client factories
        return
    default = getattr(_http, "default_client_factory", None)
    if default is None or not hasattr(huggingface_hub, "set_client_factory"):
        return

    def bounded():
        client = default()
        limit = type(client.timeout)(timeout)
        client.timeout = limit
        build_request = client.build_request

        def build_bounded_request(*args, **kwargs):
            if kwargs.get("timeout", limit) is None:  # hub calls pass timeout=None: "no limit at all"
                kwargs["timeout"] = limit
            return build_request(*args, **kwargs)

        client.build_request = build_bounded_request
        return client

    huggingface_hub.set_client_factory(bounded)


def _network_problem(error: BaseException) -> str | None:
    """A one-line description when ``error`` (or its cause) is a network, proxy, SSL or timeout failure."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {cls.__name__ for cls in type(current).__mro__}
        if "OfflineModeIsEnabled" in names:
            return None  # the user chose offline mode: the not-in-cache message applies
        if names & {"TransportError", "TimeoutException", "ConnectionError", "SSLError", "ProxyError", "Timeout",
                    "TimeoutError"}:  # fmt: skip
            return f"{type(current).__name__}: {(str(current).splitlines() or [''])[0]}"
        current = current.__cause__ or current.__context__
    return None


def _local_folder_problem(folder: Path, error: Exception) -> str:
    """Which component file of a local pipeline folder is missing or damaged, for the error message."""
    from safetensors import safe_open

    first = (str(error).splitlines() or [""])[0]
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as bad:
        return f"{folder / 'model_index.json'} cannot be read ({bad}); save the pipeline again with `save_pretrained`"
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        part = folder / name
        if not part.is_dir():
            return f"{folder}: component `{name}` is missing (no folder {part}); the pipeline folder is incomplete"
        for weights in sorted(part.glob("*.safetensors")):
            try:
                with safe_open(str(weights), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118
                        handle.get_slice(key)
            except Exception as bad:
                return f"{weights} is damaged or incomplete ({str(bad).splitlines()[0]}); copy or save it again"
    return f"{folder} could not be loaded as a pipeline: {type(error).__name__}: {first}"


def load_pipeline(
    model: str | Path | Any = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    local_files_only: bool | None = None,
) -> Any:
    """A ready pipeline from a hub id, a local folder, or an already built pipeline.

    Weights are read as safetensors only (no pickles) and no remote code is run.

    Args:
        model: ``None`` or ``"bundled"`` for the small model shipped with the package,
            e.g. ``"black-forest-labs/FLUX.1-schnell"``, a folder holding
            ``model_index.json``, or a pipeline object (returned as is after a support check).
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` or a torch dtype; default: the
            model's recorded dtype, else bfloat16 on CUDA and float32 elsewhere.
        device: where to move the pipeline (e.g. ``"cuda"``); None leaves it on the CPU.
        local_files_only: never touch the network; default follows ``HF_HUB_OFFLINE``.

    Raises:
        WeightsNotFoundError: the weights are neither local nor downloadable.
        UnsupportedArchitectureError: the pipeline's transformer is not supported.
    """
    if model in BUNDLED_NAMES:
        model = bundled_model_path()
        if not (model / "model_index.json").is_file():
            raise WeightsNotFoundError(
                f"The bundled model is missing from {model}; reinstall the package (`pip install -e .` from a "
                "checkout keeps it), or pass `model=` a hub id or a local pipeline folder"
            )
    elif not isinstance(model, (str, Path)):
        backend_for(getattr(model, "transformer", None), model)
        return model
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"use_safetensors": True, "dtype": _default_dtype(model, dtype, device)}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    path = Path(model).expanduser()
    looks_local = path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1
    if looks_local and not (path / "model_index.json").is_file():
        raise WeightsNotFoundError(
            f"{str(model)!r} is not a pipeline folder: expected {path / 'model_index.json'}. Save one with "
            "`pipe.save_pretrained(folder)` or download a model with `hf download <id> --local-dir "
            "<folder>`"
        )
    if not looks_local:
        bound_hub_requests()
        logger.warning("fetching %s from the Hugging Face Hub (or its cache)", model)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if looks_local else str(model), **kwargs)
    except Exception as error:
        if looks_local:  # a local folder: name the damaged part, never advise a download
            raise WeightsNotFoundError(_local_folder_problem(path, error)) from None
        network = _network_problem(error)
        if network is not None:
            raise WeightsNotFoundError(
                f"Could not reach the Hugging Face Hub for {str(model)!r} ({network}). Check the network and any "
                "proxy (HTTPS_PROXY) or SSL settings; to work offline set HF_HUB_OFFLINE=1 and pass a local "
                "pipeline folder (`hf download <id> --local-dir <folder>` on a machine with access)."
            ) from None
        if not isinstance(error, (OSError, ValueError)):
            raise
        raise WeightsNotFoundError(
            f"Could not load weights for {str(model)!r}: {error.__class__.__name__}: {str(error).splitlines()[0]}\n"
            "The model is neither a local pipeline folder nor in the Hugging Face cache, and could not be "
            "downloaded (offline, gated, or a wrong id). On a machine with network access run "
            f"`hf download {model} --local-dir <folder>` (gated models such as FLUX.1-dev need "
            "`hf auth login` and accepting the licence), then pass the folder path."
        ) from None
    backend_for(getattr(pipe, "transformer", None), pipe)
    if device is not None:
        pipe = pipe.to(device)
    return pipe
