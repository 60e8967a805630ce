"""The backends under the contract suite: one :class:`BackendCase` each.

A new backend joins the suite by adding one case: a tiny pipeline factory, the naive
reference's per-architecture parts, and how its pipeline is run in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from naive_reference import CHROMA, COGVIDEOX, FLUX, FLUX2, HUNYUAN_VIDEO, LONGCAT, QWEN_IMAGE, SD3, ReferenceArch

CFG_MODES = ("off", "batched", "negative-pass", "true-cfg")
"""Classifier-free guidance modes a pipeline may have: none; [uncond; cond] batched in one forward; a separate
negative forward by ``guidance_scale``; a separate negative forward by ``true_cfg_scale``."""


@dataclass(frozen=True)
class CfgMode:
    """One classifier-free guidance mode of a pipeline.

    Attributes:
        call: the pipeline call arguments (on top of ``BackendCase.run``) that turn the mode on.
        forwards_per_step: transformer calls per denoising step (2: the conditional, then the negative forward).
        conditional_half: each forward batches [uncond; cond].
    """

    call: dict[str, Any]
    forwards_per_step: int = 1
    conditional_half: bool = False


@dataclass(frozen=True)
class BackendCase:
    """How the contract suite builds, runs and checks one backend.

    Attributes:
        name: test id.
        factory: ``(seed, dtype) -> pipeline`` of tiny random parts.
        arch: the naive reference's per-architecture parts.
        run: pipeline call arguments of the tests (non-square size, few steps).
        layers: every traceable block of the tiny model.
        conditional_half: ``run`` makes batched [uncond; cond] forwards.
        encoded_latents: ``(pipe, x_t (B, c, H', W')) -> hidden_states`` as an encode forward passes them.
        encoded_timestep: ``t -> timestep`` as an encode forward passes it.
        blocks: every block whose outputs must stay bit-identical.
        clean_latents: ``(pipe, pixels (1, 3, H, W) in [-1, 1]) -> z`` as the pipeline's img2img encodes an image.
        pooled_text: the model conditions on pooled text (concepts get a zero pooled input).
        forwards_per_step: transformer calls per denoising step under ``run`` (2: a separate negative pass).
        frames: video models: frames of the test videos (generated and encoded); None for image models.
        noised: ``(pipe, z, eps, t) -> x_t`` as encode mode noises clean latents (default: rectified flow).
        encode_options: extra ``encode_video`` options (and CLI flags) of video models, e.g. ``num_frames`` when
            the pipeline's default frame count is that of the released model (HunyuanVideo: 129).
        attention: the attribute of a block's joint attention module (CogVideoX: ``attn1``).
        cfg: every mode of :data:`CFG_MODES`: the :class:`CfgMode` that turns it on, or why the pipeline has none.
        text_mask: the block argument that carries the pipeline's text mask (prompts of different lengths in one
            batch); None where the pipeline passes none (padded prompt tokens are keys, as in the released model).
        checkpointing_changes_output: why diffusers' own gradient-checkpointing branch computes something other
            than its plain branch (so maps with checkpointing cannot equal maps without); None where it does not.
        geometry_reads: host reads of a device tensor a traced pipeline call may add, all at its first forward:
            1 where the token geometry lives in a position-id tensor (read once per call), else 0.
        single_factory: ``(dtype) -> pipeline`` of the same tiny model with two single-stream blocks after the
            double-stream ones (backends that trace single-stream blocks); None: the backend has none.
    """

    name: str
    factory: Callable[..., Any]
    arch: ReferenceArch
    run: dict[str, Any]
    layers: tuple[int, ...]
    conditional_half: bool
    encoded_latents: Callable[[Any, torch.Tensor], torch.Tensor]
    encoded_timestep: Callable[[float], float]
    blocks: Callable[[Any], list] = field(default=lambda tr: list(tr.transformer_blocks))
    clean_latents: Callable[[Any, torch.Tensor], torch.Tensor] = field(default=lambda pipe, x: _shifted_scaled(pipe, x))
    pooled_text: bool = True
    forwards_per_step: int = 1
    frames: int | None = None
    noised: Callable[[Any, torch.Tensor, torch.Tensor, float], torch.Tensor] = field(
        default=lambda pipe, z, eps, t: (1 - t) * z + t * eps
    )
    encode_options: dict[str, Any] = field(default_factory=dict)
    attention: str = "attn"
    cfg: dict[str, CfgMode | str] = field(default_factory=dict)
    text_mask: str | None = None
    checkpointing_changes_output: str | None = None
    geometry_reads: int = 0
    single_factory: Callable[..., Any] | None = None

    @property
    def video(self) -> bool:
        return self.frames is not None

    def pipeline(self, dtype: torch.dtype = torch.float32):
        return _cached_pipeline(self.name, dtype)

    def fresh_pipeline(self, dtype: torch.dtype = torch.float32):
        return self.factory(dtype=dtype)

    def single_pipeline(self):
        """The tiny model with two single-stream blocks (cached)."""
        return _cached_single_pipeline(self.name)


def _flux_factory(dtype=torch.float32):
    from tiny_flux import make_tiny_flux_pipeline

    return make_tiny_flux_pipeline(seed=0, dtype=dtype, num_layers=3, num_single_layers=1)


def _flux_single_factory(dtype=torch.float32):
    from tiny_flux import make_tiny_flux_pipeline

    return make_tiny_flux_pipeline(seed=0, dtype=dtype, num_layers=2, num_single_layers=2)


def _chroma_single_factory(dtype=torch.float32):
    from tiny_chroma import make_tiny_chroma_pipeline

    return make_tiny_chroma_pipeline(seed=0, dtype=dtype, num_layers=2, num_single_layers=2)


def _klein_single_factory(dtype=torch.float32):
    from tiny_flux2 import make_tiny_klein_pipeline

    return make_tiny_klein_pipeline(seed=0, dtype=dtype, num_layers=2, num_single_layers=2)


def _flux2_dev_single_factory(dtype=torch.float32):
    from tiny_flux2 import make_tiny_flux2_dev_pipeline

    return make_tiny_flux2_dev_pipeline(seed=2, dtype=dtype, num_layers=2, num_single_layers=2)


def _longcat_single_factory(dtype=torch.float32):
    from tiny_longcat import make_tiny_longcat_pipeline

    return make_tiny_longcat_pipeline(seed=0, dtype=dtype, num_layers=2, num_single_layers=2)


def _hunyuanvideo_single_factory(dtype=torch.float32):
    from tiny_hunyuanvideo import make_tiny_hunyuanvideo_pipeline

    return make_tiny_hunyuanvideo_pipeline(seed=0, dtype=dtype, num_layers=2, num_single_layers=2)


def _sd3_factory(dtype=torch.float32):
    from tiny_sd3 import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(seed=0, dtype=dtype, num_layers=4)


def _sd35_factory(dtype=torch.float32):
    from tiny_sd3 import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(seed=5, dtype=dtype, num_layers=4, sd35=True)


def _chroma_factory(dtype=torch.float32):
    from tiny_chroma import make_tiny_chroma_pipeline

    return make_tiny_chroma_pipeline(seed=0, dtype=dtype, num_layers=3, num_single_layers=1)


def _qwenimage_factory(dtype=torch.float32):
    from tiny_qwenimage import make_tiny_qwenimage_pipeline

    return make_tiny_qwenimage_pipeline(seed=0, dtype=dtype, num_layers=4)


def _klein_factory(dtype=torch.float32):
    from tiny_flux2 import make_tiny_klein_pipeline

    return make_tiny_klein_pipeline(seed=0, dtype=dtype, num_layers=3, num_single_layers=1)


def _flux2_dev_factory(dtype=torch.float32):
    from tiny_flux2 import make_tiny_flux2_dev_pipeline

    return make_tiny_flux2_dev_pipeline(seed=2, dtype=dtype, num_layers=3, num_single_layers=1)


def _longcat_factory(dtype=torch.float32):
    from tiny_longcat import make_tiny_longcat_pipeline

    return make_tiny_longcat_pipeline(seed=0, dtype=dtype, num_layers=3, num_single_layers=1)


def _cogvideox_factory(dtype=torch.float32):
    from tiny_cogvideox import make_tiny_cogvideox_pipeline

    return make_tiny_cogvideox_pipeline(seed=0, dtype=dtype, num_layers=4)


def _cogvideox15_factory(dtype=torch.float32):
    from tiny_cogvideox import make_tiny_cogvideox_pipeline

    return make_tiny_cogvideox_pipeline(seed=3, dtype=dtype, num_layers=4, version="1.5")


def _cogvideox_latents(pipe, pixels):
    """CogVideoX: the VAE mode of (B, 3, F, H, W) frames times its scaling factor, as (B, F', c, H', W').

    1.5 (latent frames patched in pairs): an odd count is padded at the start with the first latent frame.
    """
    z = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    z = z.permute(0, 2, 1, 3, 4)
    if pipe.transformer.config.patch_size_t == 2 and z.shape[1] % 2:
        z = torch.cat([z[:, :1], z], dim=1)
    return z


def _ddim_noised(pipe, z, eps, t):
    """x_t by the scheduler's own `add_noise` at training timestep t * 1000."""
    return pipe.scheduler.add_noise(z, eps, torch.tensor([round(t * 1000)]))


def _hunyuanvideo_factory(dtype=torch.float32):
    from tiny_hunyuanvideo import make_tiny_hunyuanvideo_pipeline

    return make_tiny_hunyuanvideo_pipeline(seed=0, dtype=dtype, num_layers=3, num_single_layers=1)


def _hunyuanvideo_latents(pipe, pixels):
    """HunyuanVideo: the VAE mode of (B, 3, F, H, W) frames times its scaling factor, (B, c, F', H', W')."""
    return pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor


def _flux2_normalised(pipe, pixels):
    """Flux.2: 2x2-patchified latents, normalised by the VAE's batch-norm running statistics."""
    z = pipe._patchify_latents(pipe.vae.encode(pixels).latent_dist.mode())
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return (z - mean) / std


def _shifted_scaled(pipe, pixels):
    z = pipe.vae.encode(pixels).latent_dist.mode()
    return (z - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor


def _qwen_normalised(pipe, pixels):
    """Qwen-Image img2img: the video VAE on one frame, then (z - mean) / std per channel."""
    z = pipe.vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1)
    return (z - mean) / std


def _packed(pipe, latents):
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


RUN = {"height": 32, "width": 48, "num_inference_steps": 2, "max_sequence_length": 16}
NEGATIVE = "a cat"  # a negative prompt unlike the test prompts: its forward gives other maps
NO_BATCHED_CFG = "no batched CFG: each guidance forward is a call of its own"
EMBEDDED_GUIDANCE = "`guidance_scale` only feeds a guidance-distilled model's guidance embedding (no negative forward)"
NO_TRUE_CFG = "the pipeline has no `true_cfg_scale`"
# What the two Flux.2 pipelines (Klein, dev) share in the suite.
FLUX2_CASE: dict[str, Any] = {
    "arch": FLUX2,
    "layers": (0, 1, 2),
    "conditional_half": False,
    "encoded_latents": lambda pipe, latents: pipe._pack_latents(latents),
    "encoded_timestep": lambda t: t,
    "blocks": lambda tr: [*tr.transformer_blocks, *tr.single_transformer_blocks],
    "clean_latents": _flux2_normalised,
    "pooled_text": False,
    "geometry_reads": 1,  # the target grid from `img_ids`
}

CASES = [
    BackendCase(
        name="flux",
        factory=_flux_factory,
        single_factory=_flux_single_factory,
        arch=FLUX,
        run=RUN,
        layers=(0, 1, 2),
        conditional_half=False,
        encoded_latents=_packed,
        encoded_timestep=lambda t: t,
        blocks=lambda tr: [*tr.transformer_blocks, *tr.single_transformer_blocks],
        geometry_reads=1,  # the grid from `img_ids`
        cfg={
            "off": CfgMode({}),
            "batched": NO_BATCHED_CFG,
            "negative-pass": EMBEDDED_GUIDANCE,
            "true-cfg": CfgMode({"true_cfg_scale": 2.0, "negative_prompt": NEGATIVE}, forwards_per_step=2),
        },
    ),
    *(
        BackendCase(
            name=name,
            factory=factory,
            arch=SD3,
            run={**RUN, "guidance_scale": 4.0},  # batched classifier-free guidance
            layers=(0, 1, 2),
            conditional_half=True,
            encoded_latents=lambda pipe, latents: latents,
            encoded_timestep=lambda t: t * 1000,
            cfg={
                "off": CfgMode({"guidance_scale": 1.0}),
                "batched": CfgMode({"guidance_scale": 4.0, "negative_prompt": NEGATIVE}, conditional_half=True),
                "negative-pass": "guidance batches [uncond; cond] into one forward (skip-layer guidance's extra "
                "forward skips blocks: not a negative pass)",
                "true-cfg": NO_TRUE_CFG,
            },
        )
        for name, factory in (("sd3", _sd3_factory), ("sd3.5", _sd35_factory))
    ),
    BackendCase(
        name="chroma",
        factory=_chroma_factory,
        single_factory=_chroma_single_factory,
        arch=CHROMA,
        run=RUN,  # guidance_scale 5 by default: a separate negative-prompt forward per step
        layers=(0, 1, 2),
        conditional_half=False,
        encoded_latents=_packed,
        encoded_timestep=lambda t: t,
        blocks=lambda tr: [*tr.transformer_blocks, *tr.single_transformer_blocks],
        pooled_text=False,
        forwards_per_step=2,
        geometry_reads=1,  # the grid from `img_ids`
        cfg={
            "off": CfgMode({"guidance_scale": 1.0}),
            "batched": NO_BATCHED_CFG,
            "negative-pass": CfgMode({"guidance_scale": 5.0, "negative_prompt": NEGATIVE}, forwards_per_step=2),
            "true-cfg": NO_TRUE_CFG + ": its `guidance_scale` > 1 is already a separate negative forward",
        },
        text_mask="attention_mask",  # (B, T + N): padded prompt tokens masked, one padding token kept
        checkpointing_changes_output="diffusers' ChromaTransformer2DModel calls its single blocks without "
        "`attention_mask` under gradient checkpointing (its plain branch passes it): a different computation",
    ),
    BackendCase(
        name="qwenimage",
        factory=_qwenimage_factory,
        arch=QWEN_IMAGE,
        run={**RUN, "true_cfg_scale": 4.0, "negative_prompt": " "},  # a separate negative forward per step
        layers=(0, 1, 2),  # block 3, the last, is never scored
        conditional_half=False,
        encoded_latents=_packed,
        encoded_timestep=lambda t: t,
        clean_latents=_qwen_normalised,
        pooled_text=False,
        forwards_per_step=2,
        cfg={
            "off": CfgMode({"true_cfg_scale": 1.0}),
            "batched": NO_BATCHED_CFG,
            "negative-pass": EMBEDDED_GUIDANCE,
            "true-cfg": CfgMode({"true_cfg_scale": 4.0, "negative_prompt": NEGATIVE}, forwards_per_step=2),
        },
        text_mask="encoder_hidden_states_mask",  # (B, T); None when no prompt is padded
    ),
    BackendCase(
        name="flux2-klein",
        factory=_klein_factory,
        single_factory=_klein_single_factory,
        run={**RUN, "max_sequence_length": 64},  # guidance_scale 4 by default: a separate negative forward
        forwards_per_step=2,
        cfg={
            "off": CfgMode({"guidance_scale": 1.0}),
            "batched": NO_BATCHED_CFG,
            # no `negative_prompt` argument: the negative forward encodes ""
            "negative-pass": CfgMode({"guidance_scale": 4.0}, forwards_per_step=2),
            "true-cfg": NO_TRUE_CFG + ": its `guidance_scale` > 1 is already a separate negative forward",
        },
        **FLUX2_CASE,
    ),
    BackendCase(
        name="flux2-dev",
        factory=_flux2_dev_factory,
        single_factory=_flux2_dev_single_factory,
        run={**RUN, "max_sequence_length": 256},  # the system message takes most of the budget
        cfg={
            "off": CfgMode({}),
            "batched": "guidance-distilled: " + EMBEDDED_GUIDANCE,
            "negative-pass": "guidance-distilled: " + EMBEDDED_GUIDANCE,
            "true-cfg": NO_TRUE_CFG + " (guidance-distilled)",
        },
        **FLUX2_CASE,
    ),
]
CASES += [
    BackendCase(
        name=name,
        factory=factory,
        arch=COGVIDEOX,
        # 9 frames: 3 latent frames (the causal VAE decodes an odd latent count back to 9 frames).
        run={**RUN, "num_frames": 9, "guidance_scale": 6.0},  # batched classifier-free guidance
        layers=(0, 1, 2, 3),
        conditional_half=True,
        encoded_latents=lambda pipe, latents: latents,
        encoded_timestep=lambda t: round(t * 1000),
        clean_latents=_cogvideox_latents,
        pooled_text=False,
        frames=9,
        noised=_ddim_noised,
        attention="attn1",
        cfg={
            "off": CfgMode({"guidance_scale": 1.0}),
            "batched": CfgMode({"guidance_scale": 6.0, "negative_prompt": NEGATIVE}, conditional_half=True),
            "negative-pass": "guidance batches [uncond; cond] into one forward",
            "true-cfg": NO_TRUE_CFG,
        },
    )
    for name, factory in (("cogvideox", _cogvideox_factory), ("cogvideox1.5", _cogvideox15_factory))
]
CASES.append(
    BackendCase(
        name="hunyuanvideo",
        factory=_hunyuanvideo_factory,
        single_factory=_hunyuanvideo_single_factory,
        arch=HUNYUAN_VIDEO,
        run={**RUN, "num_frames": 5},  # 2 latent frames; true CFG (a separate negative forward) is off by default
        layers=(0, 1, 2),
        conditional_half=False,
        encoded_latents=lambda pipe, latents: latents,  # (B, c, F', H', W') as the pipeline passes them
        encoded_timestep=lambda t: t * 1000,
        blocks=lambda tr: [*tr.transformer_blocks, *tr.single_transformer_blocks],
        clean_latents=_hunyuanvideo_latents,
        frames=5,
        encode_options={"num_frames": 5},  # the pipeline's default is 129 frames
        cfg={
            "off": CfgMode({}),
            "batched": NO_BATCHED_CFG,
            "negative-pass": EMBEDDED_GUIDANCE,
            "true-cfg": CfgMode({"true_cfg_scale": 3.0, "negative_prompt": NEGATIVE}, forwards_per_step=2),
        },
        text_mask="attention_mask",  # (B, 1, 1, N + T) bool: padded prompt tokens are not keys
    )
)
CASES.append(
    BackendCase(
        name="longcat",
        factory=_longcat_factory,
        single_factory=_longcat_single_factory,
        arch=LONGCAT,
        # No `max_sequence_length` argument: every prompt is padded to `pipe.tokenizer_max_length` (512). Prompt
        # rewriting (on by default) is a text-encoder generation before the denoising loop: off. guidance_scale 4.5
        # by default: a separate negative-prompt forward per step.
        run={k: v for k, v in RUN.items() if k != "max_sequence_length"} | {"enable_prompt_rewrite": False},
        layers=(0, 1, 2),
        conditional_half=False,
        encoded_latents=_packed,
        encoded_timestep=lambda t: t,  # the pipeline passes t / 1000 in [0, 1]
        blocks=lambda tr: [*tr.transformer_blocks, *tr.single_transformer_blocks],
        pooled_text=False,
        forwards_per_step=2,
        cfg={
            "off": CfgMode({"guidance_scale": 1.0}),
            "batched": NO_BATCHED_CFG,
            "negative-pass": CfgMode({"guidance_scale": 4.5, "negative_prompt": NEGATIVE}, forwards_per_step=2),
            "true-cfg": NO_TRUE_CFG + ": its `guidance_scale` > 1 is already a separate negative forward",
        },
        text_mask=None,  # the prompt block is padded to 512 tokens, all of them keys, as in the released model
        geometry_reads=1,  # the grid from `img_ids`
    )
)
CASES_BY_NAME = {case.name: case for case in CASES}


@cache
def _cached_pipeline(name: str, dtype: torch.dtype):
    return CASES_BY_NAME[name].factory(dtype=dtype)


@cache
def _cached_single_pipeline(name: str):
    factory = CASES_BY_NAME[name].single_factory
    assert factory is not None, f"{name} has no single-stream blocks"
    return factory()
