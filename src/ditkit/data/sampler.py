"""Epoch-based batches from an in-memory dataset, with a position that resumes exactly.

The order of epoch ``e`` (a permutation, and a flip decision per image) is a pure function of
``(seed, e)``, so the whole data stream is fixed by the seed and the state is just
``(epoch, batch index)``. A batch is one gather from the big uint8 tensor by a slice of the
permutation: no per-item Python work on the hot path.

Several processes (``shard(rank, world_size)``, set by ``ditkit.train.distributed``) walk the same
order in step: ``batch_size`` stays the global batch and rank ``r`` takes rows ``[r b, (r + 1) b)``
of it, ``b = batch_size // world_size``. This plays the role of ``DistributedSampler.set_epoch`` (one
order per epoch shared by all ranks, disjoint shares) and also keeps the mid-epoch position; the
state is the same on every rank and for any number of ranks, so a run resumes exactly on another
number of processes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ditkit.data.images import DataError, ImageDataset

__all__ = ["EpochBatchSampler", "to_model_range"]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return images.float().div_(127.5).sub_(1.0)


class ResumableEpochOrder:
    """Where a seeded epoch-based batch order stands: (seed, epoch, position), which is all a
    checkpoint needs to continue it exactly. Users set seed, batch_size, steps_per_epoch, epoch
    and position."""

    seed: int
    batch_size: int
    steps_per_epoch: int
    epoch: int
    position: int

    def _advance(self) -> None:
        """One batch further; a new epoch after ``steps_per_epoch`` batches."""
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise DataError(
                f"cannot resume the data order: the checkpoint used seed {state['seed']} and batch "
                f"{state['batch_size']}, this run seed {self.seed} and batch {self.batch_size}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class EpochBatchSampler(ResumableEpochOrder):
    """Yields ``(x (B, C, H, W) float32 in [-1, 1], y (B,) int64 or None)`` forever, epoch after epoch.

    The last incomplete batch of an epoch is dropped (as the official DiT loader does), so every
    step sees ``batch_size`` images and ``steps_per_epoch = len(dataset) // batch_size``.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        seed: int = 0,
        hflip: bool = False,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size > len(dataset):
            raise DataError(
                f"batch size {batch_size} is larger than the dataset ({len(dataset)} images from "
                f"{dataset.source}): lower --global-batch-size (or train.grad_accum_steps splits it)"
            )
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device) if dataset.labels is not None else None
        self.batch_size, self.seed, self.hflip = batch_size, seed, hflip
        self.steps_per_epoch = len(dataset) // batch_size
        self.epoch, self.position = 0, 0  # next batch: index `position` of epoch `epoch`
        self._plan_epoch: Optional[int] = None
        self._perm = self._flip = None
        self.shard(rank, world_size)

    def shard(self, rank: int, world_size: int) -> None:
        """Yield only rank ``rank``'s ``batch_size // world_size`` rows of each global batch (see the
        module doc); ``shard(0, 1)`` is the whole batch. The order and the state do not change."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} of {world_size} processes: need 0 <= rank < world_size")
        if self.batch_size % world_size:
            raise DataError(
                f"the batch of {self.batch_size} does not split over {world_size} processes: use a "
                f"--global-batch-size divisible by {world_size} x train.grad_accum_steps"
            )
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = self.batch_size // world_size

    def _plan(self) -> None:
        """Build this epoch's permutation and flip decisions from ``(seed, epoch)``."""
        if self._plan_epoch == self.epoch:
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = self.images.shape[0]
        self._perm = torch.randperm(n, generator=g).to(self.device)
        self._flip = (torch.rand(n, generator=g) < 0.5).to(self.device) if self.hflip else None
        self._plan_epoch = self.epoch

    def next_batch(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The next batch (this rank's rows of it); advances the position (and the epoch at its end)."""
        self._plan()
        lo = self.position * self.batch_size + self.rank * self.local_batch_size
        idx = self._perm[lo : lo + self.local_batch_size]
        x = to_model_range(self.images[idx])
        if self._flip is not None:
            flip = self._flip[lo : lo + self.local_batch_size].view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        y = self.labels[idx] if self.labels is not None else None
        self._advance()
        return x, y

