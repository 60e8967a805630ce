"""On-device running sums of per-block saliency over (timestep, block)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ScoreAccumulator:
    """Running mean of (B, C, N) saliency maps per item, kept on the model's device in float32.

    Only sums and counts are stored (no per-layer activations). A forward's batch rows may
    belong to different items (several noise draws of one image in one forward): ``add``
    then takes the item of each row and sums rows into their item, so the mean is the same
    however the rows were batched. With ``per_block=True`` one sum per selected block is also
    kept, so that per-block sweeps come out of a single pass at the cost of L extra buffers.

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
        self._counts: torch.Tensor | None = None  # (B,) additions per item
        self._block_sums: torch.Tensor | None = None  # (L, B, C, N)
        self._block_counts: torch.Tensor | None = None  # (L, B)
        self.count = 0

    def add(
        self, scores: torch.Tensor, block: int, items: torch.Tensor | None = None, num_items: int | None = None
    ) -> None:
        """Add one block's saliency.

        Args:
            scores: (R, C, N) saliency of ``block`` for the R batch rows of one forward.
            block: index of the block that produced it; must be one of ``blocks``.
            items: (R,) int64 item of each row (on the scores' device); None: row r is item r.
            num_items: B, the number of items (required with ``items`` on the first add).
        """
        scores = scores.float()
        if self._sum is None:
            batch = scores.shape[0] if items is None else num_items
            if batch is None:
                raise ValueError("`num_items` is required when rows are mapped to items")
            self._sum = scores.new_zeros((batch, *scores.shape[1:]))
            self._counts = scores.new_zeros(batch)
            if self.per_block:
                self._block_sums = scores.new_zeros((len(self.blocks), batch, *scores.shape[1:]))
                self._block_counts = scores.new_zeros((len(self.blocks), batch))
        elif self._sum.shape[1:] != scores.shape[1:] or (items is None and scores.shape[0] != self._sum.shape[0]):
            raise ValueError(
                f"Saliency of shape {tuple(scores.shape)} cannot be accumulated with earlier ones of shape "
                f"{tuple(self._sum.shape)}: batch, concepts and image size must stay fixed within one run."
            )
        assert self._counts is not None
        if items is None:
            self._sum.add_(scores)
            self._counts.add_(1.0)
        else:
            self._sum.index_add_(0, items, scores)
            self._counts.index_add_(0, items, torch.ones_like(items, dtype=scores.dtype))
        self.count += 1
        if self._block_sums is not None and self._block_counts is not None:
            i = self._index[block]
            if items is None:
                self._block_sums[i].add_(scores)
                self._block_counts[i].add_(1.0)
            else:
                self._block_sums[i].index_add_(0, items, scores)
                self._block_counts[i].index_add_(0, items, torch.ones_like(items, dtype=scores.dtype))

    def mean(self) -> torch.Tensor:
        """(B, C, N) mean per item over everything added."""
        if self._sum is None or self._counts is None:
            raise RuntimeError("No concept saliency was recorded: nothing has been accumulated yet.")
        return self._sum / self._counts.clamp(min=1).view(-1, 1, 1)

    def block_means(self) -> torch.Tensor:
        """(L, B, C, N) mean per selected block and item (requires ``per_block=True``)."""
        if self._block_sums is None or self._block_counts is None:
            raise RuntimeError("Per-block maps were not kept: set `per_block=True` in the config.")
        return self._block_sums / self._block_counts.clamp(min=1).unsqueeze(-1).unsqueeze(-1)
