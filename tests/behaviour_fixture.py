"""The saved behaviour of every backend: maps and per-block maps, before and after a refactor.

``python tests/behaviour_fixture.py`` (from the repository root, with the package installed)
computes, for every contract case, the maps and per-block maps of a traced generation and of an
encode (two noise draws in micro-batches of one row, so rows map to items), plus the bundled
model's demo scenes, and writes them to ``tests/fixtures/behaviour.safetensors`` with the
machine they were computed on. ``tests/contract/test_behaviour_fixture.py`` recomputes them and
compares: bit for bit on the machine kind that wrote them (same torch build, CPU capability
and thread count), to 2e-5 elsewhere (other kernels and reduction orders round differently).
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "behaviour.safetensors"
CONCEPTS = ("dog", "grass", "sky")
PROMPT = "a dog on the grass near a tree"
BUNDLED_SCENES = (0, 1, 2, 3)


def machine() -> str:
    """What decides floating-point results here: the torch build and the CPU kernels it dispatches to."""
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}; cpu {capability}; threads {torch.get_num_threads()}"


def case_outputs(case) -> dict[str, torch.Tensor]:
    """Maps and per-block maps of one contract case: a traced generation and an encode."""
    import conceptattention as ca

    pipe = case.pipeline()
    out: dict[str, torch.Tensor] = {}
    args = {**case.run, "output_type": "pt"}
    with ca.trace(pipe, list(CONCEPTS), layers=list(case.layers), per_block=True) as tc:
        pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(3), **args)
    maps = tc.maps()
    out[f"{case.name}/generate/maps"] = maps.maps
    assert maps.block_maps is not None
    out[f"{case.name}/generate/block_maps"] = maps.block_maps
    generator = torch.Generator().manual_seed(7)
    height, width = case.run["height"], case.run["width"]
    if case.video:
        sample = torch.rand((case.frames, 3, height, width), generator=generator)
        frames = [ca_frame(f) for f in sample]
        encoded = ca.encode_video(
            pipe, frames, list(CONCEPTS), **case.encode_options, layers=list(case.layers), per_block=True,
            num_samples=2, max_batch=1, height=height, width=width,
        )  # fmt: skip
    else:
        sample = torch.rand((3, height, width), generator=generator)
        encoded = ca.encode_image(
            pipe, ca_frame(sample), list(CONCEPTS), layers=list(case.layers), per_block=True,
            num_samples=2, max_batch=1, height=height, width=width, caption="a photo",
        )  # fmt: skip
    out[f"{case.name}/encode/maps"] = encoded.maps
    assert encoded.block_maps is not None
    out[f"{case.name}/encode/block_maps"] = encoded.block_maps
    return out


def ca_frame(item: torch.Tensor):
    """A (3, H, W) tensor in [0, 1] as an 8-bit PIL image."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((item.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def bundled_outputs() -> dict[str, torch.Tensor]:
    """The bundled model's maps of the demo's held-out scenes (as ``conceptattention demo`` encodes them)."""
    import conceptattention as ca
    from conceptattention.data.scenes import make_scene

    pipe = ca.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out: dict[str, torch.Tensor] = {}
    for index in BUNDLED_SCENES:
        scene = make_scene("test", index)
        maps = ca.encode_image(pipe, scene.image, scene.concepts, caption=scene.caption, per_block=True)
        out[f"bundled/scene_{index}/maps"] = maps.maps
        assert maps.block_maps is not None
        out[f"bundled/scene_{index}/block_maps"] = maps.block_maps
    return out


def compute_all() -> dict[str, torch.Tensor]:
    from backend_cases import CASES

    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for case in CASES:
        out.update(case_outputs(case))
    out.update(bundled_outputs())
    return {key: value.contiguous().float() for key, value in out.items()}


def main() -> None:
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE))
    tensors = compute_all()
    FIXTURE.parent.mkdir(exist_ok=True)
    save_file(tensors, str(FIXTURE), metadata={"machine": machine(), "python": platform.python_version()})
    print(json.dumps({"written": str(FIXTURE), "tensors": len(tensors), "machine": machine()}))


if __name__ == "__main__":
    main()
