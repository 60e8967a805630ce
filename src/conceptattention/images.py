"""Reading user images (PIL, path, numpy, tensor) into RGB PIL images, with clear errors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from conceptattention.errors import ConceptAttentionError

logger = logging.getLogger(__name__)

ImageInput = Image.Image | str | Path | np.ndarray | torch.Tensor


def _from_array(array: np.ndarray, what: str) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ConceptAttentionError(
            f"{what} has shape {tuple(array.shape)}; expected (height, width), (height, width, 3|4) "
            "or (3|4, height, width)"
        )
    if np.issubdtype(array.dtype, np.floating):
        if array.size and not np.isfinite(array).all():
            raise ConceptAttentionError(f"{what} contains NaN or infinite values; pass finite values in [0, 1]")
        if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
            raise ConceptAttentionError(
                f"{what} is a float array with values outside [0, 1] (min {np.nanmin(array):.3g}, max "
                f"{np.nanmax(array):.3g}); scale it to [0, 1] or pass uint8 values in [0, 255]"
            )
        array = (array * 255).round()
    elif array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
        raise ConceptAttentionError(f"{what} has integer values outside [0, 255]; pass uint8 values")
    return Image.fromarray(array.astype(np.uint8))


def load_image(image: ImageInput, what: str = "`image`") -> Image.Image:
    """One image as RGB PIL.

    Args:
        image: a PIL image (any mode), a file path, a numpy array or a tensor; arrays are
            (height, width[, 3|4]) or (3|4, height, width), uint8 in [0, 255] or float in [0, 1].

    Raises:
        ConceptAttentionError: unreadable file, unsupported shape, dtype or range.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ConceptAttentionError(f"{what}: file {str(path)!r} does not exist")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError) as error:
            raise ConceptAttentionError(f"{what}: cannot read {str(path)!r} as an image ({error})") from None
    elif isinstance(image, torch.Tensor):
        image = _from_array(image.detach().cpu().numpy(), what)
    elif isinstance(image, np.ndarray):
        image = _from_array(image, what)
    elif not isinstance(image, Image.Image):
        raise ConceptAttentionError(
            f"{what} must be a PIL image, a path, a numpy array or a tensor, got {type(image).__name__}"
        )
    # Phone photos store their rotation as an EXIF tag: apply it, so maps match what viewers show.
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        logger.info("converting %s from mode %s to RGB", what, image.mode)
        if image.mode.startswith("I") or image.mode == "F":
            image = _high_depth_to_8bit(image, what)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            background = Image.new("RGB", image.size, "white")  # flatten transparency onto white
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[-1])
            image = background
        else:
            image = image.convert("RGB")
    return image


def _high_depth_to_8bit(image: Image.Image, what: str) -> Image.Image:
    """16-bit (``I;16*``), 32-bit integer (``I``) or float (``F``) grey images -> 8-bit ``L``.

    PIL's own conversion clips these to 255 (a 16-bit PNG becomes all white). ``I;16*`` spans
    0-65535; ``I`` is read as 16-bit when a value exceeds 255, else as 8-bit; ``F`` as [0, 1]
    when its maximum is at most 1, else as [0, 255].
    """
    array = np.asarray(image, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ConceptAttentionError(f"{what} contains NaN or infinite values")
    if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) > 255):
        scale = 65535.0
    elif image.mode == "F" and array.max(initial=0) <= 1:
        scale = 1.0
    else:
        scale = 255.0
    if array.min(initial=0) < 0 or array.max(initial=0) > scale:
        raise ConceptAttentionError(f"{what} (mode {image.mode}) has values outside [0, {scale:g}]")
    return Image.fromarray((array / scale * 255).round().astype(np.uint8), mode="L")


def load_images(images: ImageInput | Sequence[ImageInput]) -> list[Image.Image]:
    """One image or a list of images as RGB PIL images."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ConceptAttentionError("`image` is an empty list; give at least one image")
        return [load_image(im, f"`image[{i}]`") for i, im in enumerate(images)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return [load_image(im, f"`image[{i}]`") for i, im in enumerate(images)]
    return [load_image(cast(ImageInput, images))]


def resize_for_model(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to ``size = (height, width)`` with Lanczos (never nearest for photographs)."""
    height, width = size
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def to_model_input(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB PIL images of equal size -> (B, 3, height, width) float32 in [-1, 1]."""
    arrays = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (B, height, width, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0
