"""On-device running sums of per-block saliency over (timestep, block)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ScoreAccumulator:
    """Running mean of (B, C, N) saliency maps, kept on the model's device in float32.

    Only a sum and a host-side counter are stored (no per-layer activations). With
    ``per_block=True`` one sum per selected block is also kept, so that per-block
    sweeps come out of a single pass at the cost of L extra (B, C, N) buffers.

    Example:
        >>> acc = ScoreAccumulator(blocks=(0, 1))
        >>> acc.add(torch.ones(1, 2, 4), block=0)
        >>> acc.add(3 * torch.ones(1, 2, 4), block=1)
        >>> acc.mean()[0, 0, 0].item()
        2.0
    """

    def __init__(self, blocks: Sequence[int], per_block: bool = False) -> None:
        self.blocks = tuple(blocks)
        self.per_block = per_block
        self._index = {block: i for i, block in enumerate(self.blocks)}
        self.reset()

    def reset(self) -> None:
        """Forget everything added so far."""
        self._sum: torch.Tensor | None = None  # (B, C, N)
        self._block_sums: torch.Tensor | None = None  # (L, B, C, N)
        self._block_counts = [0] * len(self.blocks)
        self.count = 0

    def add(self, scores: torch.Tensor, block: int) -> None:
        """Add one block's saliency.

        Args:
            scores: (B, C, N) float32 saliency of ``block`` at one timestep (or noise sample).
            block: index of the block that produced it; must be one of ``blocks``.
        """
        scores = scores.float()
        if self._sum is None:
            self._sum = torch.zeros_like(scores)
            if self.per_block:
                self._block_sums = scores.new_zeros((len(self.blocks), *scores.shape))
        elif self._sum.shape != scores.shape:
            raise ValueError(
                f"Saliency of shape {tuple(scores.shape)} cannot be accumulated with earlier ones of shape "
                f"{tuple(self._sum.shape)}: batch, concepts and image size must stay fixed within one run."
            )
        self._sum.add_(scores)
        self.count += 1
        if self._block_sums is not None:
            i = self._index[block]
            self._block_sums[i].add_(scores)
            self._block_counts[i] += 1

    def mean(self) -> torch.Tensor:
        """(B, C, N) mean over everything added."""
        if self._sum is None:
            raise RuntimeError("No concept saliency was recorded: nothing has been accumulated yet.")
        return self._sum / self.count

    def block_means(self) -> torch.Tensor:
        """(L, B, C, N) mean per selected block (requires ``per_block=True``)."""
        if self._block_sums is None:
            raise RuntimeError("Per-block maps were not kept: set `per_block=True` in the config.")
        counts = torch.tensor(self._block_counts, dtype=torch.float32, device=self._block_sums.device)
        return self._block_sums / counts.clamp(min=1).view(-1, 1, 1, 1)
