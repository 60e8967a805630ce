"""Train the bundled model on synthetic scenes: seeded, resumable, checkpoints chosen by grounding.

Stages: (1) train the pixel-space autoencoder; (2) fit the latent shift/scale;
(3) train the Flux transformer with flow matching on latents and captions (caption
dropout), evaluating held-out grounding (ConceptAttention mIoU on validation
scenes, at the training resolution) every ``eval_every`` steps and keeping the best
checkpoint. Text encoders stay frozen at their seeded random weights; by default the
T5 encoder is token-wise and the transformer ignores the pooled CLIP vector (see
:class:`~conceptattention.bundled.model.BundledModelConfig`).

Usage:
    python -m conceptattention.bundled.train --work runs/bundled --minutes 80
    python -m conceptattention.bundled.train --work runs/bundled --export src/conceptattention/bundled/model

Rerunning with the same ``--work`` resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from conceptattention.bundled.model import BundledModelConfig, build_untrained
from conceptattention.data.scenes import make_scene

logger = logging.getLogger("conceptattention.train")


@dataclass
class TrainSettings:
    seed: int = 0
    train_scenes: int = 40000
    val_scenes: int = 256
    batch_size: int = 32
    lr: float = 4e-4
    warmup: int = 200
    caption_dropout: float = 0.1
    word_captions: float = 0.0  # probability of captioning with one visible concept word alone
    ema_decay: float = 0.995
    vae_steps: int = 800
    eval_every: int = 300
    minutes: float = 80.0
    decay_minutes: float = 15.0  # cosine decay of the learning rate to 10 % over the last minutes of the budget
    max_steps: int | None = None


def _decay(elapsed: float, settings: TrainSettings) -> float:
    """Learning-rate factor: 1, then a cosine from 1 to 0.1 over the last ``decay_minutes``."""
    start = (settings.minutes - settings.decay_minutes) * 60
    if settings.decay_minutes <= 0 or elapsed <= start:
        return 1.0
    progress = min(1.0, (elapsed - start) / (settings.decay_minutes * 60))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _caption_variant(caption: str, rng: np.random.Generator, settings: TrainSettings) -> str:
    """Caption dropout, and optionally one concept word alone: concepts are encoded alone at inference."""
    draw = rng.random()
    if draw < settings.caption_dropout:
        return ""
    if draw < settings.caption_dropout + settings.word_captions:
        words = caption.removeprefix("a photo of ").replace(" and ", ", ").split(", ")
        return words[int(rng.integers(len(words)))]
    return caption


def scene_batch(indices: np.ndarray, size: int) -> tuple[torch.Tensor, list[str]]:
    scenes = [make_scene("train", int(i), size) for i in indices]
    pixels = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, [s.caption for s in scenes]


def train_autoencoder(pipe, settings: TrainSettings, size: int) -> list[float]:
    """Reconstruction training of the pixel-space autoencoder (small KL weight)."""
    vae = pipe.vae.train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for step in range(settings.vae_steps):
        rng = np.random.default_rng([settings.seed, 7, step])
        pixels, _ = scene_batch(rng.integers(0, settings.train_scenes, 64), size)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - pixels).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0:
            logger.info("autoencoder step %d loss %.4f", step, losses[-1])
    vae.eval()
    return losses


@torch.no_grad()
def fit_latent_statistics(pipe, settings: TrainSettings, size: int) -> None:
    """Set the VAE's shift and scaling factors so that training latents have mean 0 and std 1."""
    rng = np.random.default_rng([settings.seed, 8])
    pixels, _ = scene_batch(rng.integers(0, settings.train_scenes, 512), size)
    latents = pipe.vae.encode(pixels).latent_dist.mode()
    pipe.vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))


@torch.no_grad()
def encode_batch(pipe, pixels: torch.Tensor, captions: list[str], max_sequence_length: int):
    vae = pipe.vae
    latents = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=captions, prompt_2=None, device="cpu", max_sequence_length=max_sequence_length
    )
    return latents, prompt_embeds, pooled, text_ids


def flow_matching_loss(pipe, transformer, latents, prompt_embeds, pooled, text_ids, generator) -> torch.Tensor:
    """Velocity loss at logit-normal times: x_t = (1 - t) z + t eps, target eps - z."""
    batch, channels, height, width = latents.shape
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    noise = torch.randn(latents.shape, generator=generator)
    noisy = (1 - t.view(-1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1) * noise
    packed = pipe._pack_latents(noisy, batch, channels, height, width)
    target = pipe._pack_latents(noise - latents, batch, channels, height, width)
    img_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
    pred = transformer(
        hidden_states=packed,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        timestep=t,
        img_ids=img_ids,
        txt_ids=text_ids,
        return_dict=False,
    )[0]
    return (pred - target).pow(2).mean()


def grounding(pipe, ema_transformer, settings: TrainSettings, config: BundledModelConfig) -> dict[str, Any]:
    """Held-out ConceptAttention mIoU on validation scenes (the checkpoint criterion), via the eval harness.

    Evaluated at the pipeline's default size, which :func:`build_untrained` sets to the training
    resolution. Returns ``{"miou": ..., "blocks": [per-block mIoU]}``.
    """
    from conceptattention.eval.config import EvalConfig
    from conceptattention.eval.datasets import SceneDataset
    from conceptattention.eval.harness import score_dataset

    trained = pipe.transformer
    pipe.transformer = ema_transformer
    try:
        dataset = SceneDataset("val", settings.val_scenes)
        [row] = score_dataset(pipe, dataset, EvalConfig(dataset="scenes", per_block=True),
                              max_sequence_length=config.max_sequence_length)  # fmt: skip
    finally:
        pipe.transformer = trained
    return {"miou": row["miou"], "blocks": [block["miou"] for block in row["blocks"]]}


def save_checkpoint(path: Path, pipe, ema, optimizer, step: int, elapsed: float, best: float) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(pipe.transformer.state_dict(), tmp / "transformer.safetensors")
    save_file(ema.state_dict(), tmp / "ema.safetensors")
    save_file(pipe.vae.state_dict(), tmp / "vae.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(
        json.dumps({"step": step, "elapsed": elapsed, "best": best, "vae_config": dict(pipe.vae.config)})
    )
    if path.exists():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    tmp.rename(path)


def train(work: Path, settings: TrainSettings, config: BundledModelConfig) -> None:
    torch.manual_seed(settings.seed)
    work.mkdir(parents=True, exist_ok=True)
    pipe = build_untrained(config, seed=settings.seed)
    ckpt = work / "checkpoint"
    log_path = work / "log.jsonl"
    ema = copy.deepcopy(pipe.transformer).requires_grad_(False)
    optimizer = torch.optim.AdamW(pipe.transformer.parameters(), lr=settings.lr, weight_decay=0.01)
    step, elapsed, best = 0, 0.0, -1.0
    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        pipe.transformer.load_state_dict(load_file(ckpt / "transformer.safetensors"))
        ema.load_state_dict(load_file(ckpt / "ema.safetensors"))
        pipe.vae.load_state_dict(load_file(ckpt / "vae.safetensors"))
        pipe.vae.register_to_config(
            shift_factor=state["vae_config"]["shift_factor"], scaling_factor=state["vae_config"]["scaling_factor"]
        )
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        step, elapsed, best = state["step"], state["elapsed"], state["best"]
        logger.info("resumed at step %d (%.1f min trained)", step, elapsed / 60)
    else:
        start = time.time()
        vae_losses = train_autoencoder(pipe, settings, config.image_size)
        fit_latent_statistics(pipe, settings, config.image_size)
        elapsed = time.time() - start
        with log_path.open("a") as log:
            log.write(
                json.dumps(
                    {
                        "stage": "autoencoder",
                        "loss_first": vae_losses[0],
                        "loss_last": vae_losses[-1],
                        "seconds": round(elapsed, 1),
                    }
                )
                + "\n"
            )
        pipe.vae.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.text_encoder_2.requires_grad_(False)
    transformer = pipe.transformer.train()
    budget = settings.minutes * 60
    window: list[float] = []
    started = time.time() - elapsed
    while elapsed < budget and (settings.max_steps is None or step < settings.max_steps):
        rng = np.random.default_rng([settings.seed, 1, step])
        pixels, captions = scene_batch(rng.integers(0, settings.train_scenes, settings.batch_size), config.image_size)
        captions = [_caption_variant(c, rng, settings) for c in captions]
        latents, prompt_embeds, pooled, text_ids = encode_batch(pipe, pixels, captions, config.max_sequence_length)
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        loss = flow_matching_loss(pipe, transformer, latents, prompt_embeds, pooled, text_ids, generator)
        lr = settings.lr * min(1.0, (step + 1) / settings.warmup) * _decay(elapsed, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), transformer.parameters()):
                p_ema.lerp_(p, 1 - settings.ema_decay)
        window.append(float(loss.detach()))
        step += 1
        elapsed = time.time() - started
        if step % settings.eval_every == 0 or elapsed >= budget:
            transformer.eval()
            val = grounding(pipe, ema, settings, config)
            score = val["miou"]
            transformer.train()
            record = {
                "step": step,
                "minutes": round(elapsed / 60, 2),
                "loss": round(float(np.mean(window)), 5),
                "val_miou": round(score, 4),
                "val_miou_blocks": [round(b, 4) for b in val["blocks"]],
                "lr": lr,
            }
            window = []
            logger.info("%s", record)
            if score > best:
                best = score
                save_file(ema.state_dict(), work / "best_transformer.safetensors")
                record["best"] = True
            with log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            save_checkpoint(ckpt, pipe, ema, optimizer, step, elapsed, best)
    logger.info("finished at step %d, best val mIoU %.4f", step, best)


def work_config(work: Path, requested: BundledModelConfig) -> BundledModelConfig:
    """The architecture recorded in ``work`` (a run resumes and exports as it started), else ``requested``."""
    path = work / "config.json"
    if path.is_file():
        recorded = BundledModelConfig(**json.loads(path.read_text()))
        if recorded != requested:
            logger.info("using the architecture recorded in %s: %s", path, recorded)
        return recorded
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(requested.to_dict(), indent=2) + "\n")
    return requested


def export(work: Path, out: Path, config: BundledModelConfig, seed: int = 0) -> None:
    """Write the best checkpoint as a diffusers pipeline folder (fp16 safetensors) plus defaults."""
    pipe = build_untrained(config, seed=seed)
    state = json.loads((work / "checkpoint" / "state.json").read_text())
    pipe.vae.load_state_dict(load_file(work / "checkpoint" / "vae.safetensors"))
    pipe.vae.register_to_config(
        shift_factor=state["vae_config"]["shift_factor"], scaling_factor=state["vae_config"]["scaling_factor"]
    )
    pipe.transformer.load_state_dict(load_file(work / "best_transformer.safetensors"))
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    defaults = {
        "height": config.image_size,
        "width": config.image_size,
        "max_sequence_length": config.max_sequence_length,
        "num_inference_steps": 20,
        "torch_dtype": "float32",
        "architecture": config.to_dict(),
    }
    (out / "conceptattention.json").write_text(json.dumps(defaults, indent=2) + "\n")


def write_report(work: Path, model: Path, out: Path) -> list[Path]:
    """Training curves (loss, held-out grounding) and a grid of samples from the exported model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from PIL import Image, ImageDraw

    from conceptattention.generate import generate
    from conceptattention.loading import load_pipeline

    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step" in r]
    # Rows without per-block values come from before the criterion was measured at the training
    # resolution (128 px instead of 32 px); they are not comparable and are left out.
    scored = [r for r in rows if "val_miou_blocks" in r]
    figure = Figure(figsize=(9, 3.2))
    left, right = figure.subplots(1, 2)
    left.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    left.set(xlabel="step", ylabel="flow-matching loss", title="training loss")
    steps = [r["step"] for r in scored]
    right.plot(steps, [r["val_miou"] for r in scored], marker="o", color="black", label="all blocks (criterion)")
    for b, block_curve in enumerate(zip(*(r["val_miou_blocks"] for r in scored))):
        right.plot(steps, block_curve, linewidth=0.8, label=f"block {b}")
    right.set(xlabel="step", ylabel="mIoU", title="held-out grounding (val scenes)")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "training_curves.png", dpi=110)

    pipe = load_pipeline(model)
    scenes = [make_scene("test", i) for i in range(8)]
    tiles = []
    for i, scene in enumerate(scenes):
        maps = generate(pipe, scene.caption, list(scene.concepts), seed=i)
        row = [maps.images[0].resize((96, 96), Image.Resampling.NEAREST)]
        row += [tile.resize((96, 96)) for tile in maps.heatmaps(0).values()]
        tiles.append((scene.caption, list(scene.concepts), row))
    width = 96 * max(len(r) for _, _, r in tiles)
    grid = Image.new("RGB", (width, len(tiles) * 112), "white")
    draw = ImageDraw.Draw(grid)
    for k, (caption, concepts, row) in enumerate(tiles):
        draw.text((2, k * 112), f"{caption}  | maps: {', '.join(concepts)}", fill="black")
        for j, tile in enumerate(row):
            grid.paste(tile, (96 * j, k * 112 + 14))
    grid.save(out / "samples.png")
    return [out / "training_curves.png", out / "samples.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the bundled ConceptAttention demo model.")
    parser.add_argument("--work", type=Path, default=Path("runs/bundled"))
    parser.add_argument("--minutes", type=float, default=TrainSettings.minutes)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--decay-minutes", type=float, default=TrainSettings.decay_minutes, help="cosine LR decay over the last minutes"
    )
    parser.add_argument("--word-captions", type=float, default=0.0, help="probability of one-word captions")
    parser.add_argument("--contextual-text", action="store_true", help="T5 self-attention mixes the caption's words")
    parser.add_argument("--pooled-text", action="store_true", help="the transformer reads the pooled CLIP vector")
    parser.add_argument("--num-layers", type=int, default=BundledModelConfig.num_layers, help="double-stream blocks")
    parser.add_argument(
        "--num-single-layers", type=int, default=BundledModelConfig.num_single_layers, help="single-stream blocks"
    )
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--val-scenes", type=int, default=TrainSettings.val_scenes)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", type=Path, default=None, help="write the best checkpoint as a pipeline folder")
    parser.add_argument("--report", type=Path, default=None, help="write curves and samples of --export's model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.num_single_layers < 1 or args.num_layers < 1:
        parser.error("--num-layers and --num-single-layers must be >= 1 (the last double block's text path needs a "
                     "single-stream block after it to receive gradient)")  # fmt: skip
    requested = BundledModelConfig(
        text_context=args.contextual_text,
        pooled_text=args.pooled_text,
        num_layers=args.num_layers,
        num_single_layers=args.num_single_layers,
    )
    config = work_config(args.work, requested)
    if args.report is not None:
        write_report(args.work, args.export, args.report)
        return
    if args.export is not None:
        export(args.work, args.export, config, seed=args.seed)
        return
    settings = TrainSettings(
        seed=args.seed,
        minutes=args.minutes,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        decay_minutes=args.decay_minutes,
        word_captions=args.word_captions,
        lr=args.lr,
        val_scenes=args.val_scenes,
    )
    train(args.work, settings, config)


if __name__ == "__main__":
    main()
