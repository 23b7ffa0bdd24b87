"""Exponential moving average of the weights (Polyak averaging), the weights DiT samples with.

``ema = decay * ema + (1 - decay) * weights`` after each optimiser step, done as one fused
``_foreach_lerp_`` over all tensors. With warm-up the decay after ``n`` updates is
``min(decay, (1 + n) / (10 + n))`` (the TensorFlow ExponentialMovingAverage ``num_updates`` rule),
so a short run's EMA is not dominated by the random initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Holds a frozen copy of ``model`` (``self.model``, eval mode) and updates it in place."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0
        # Trainable parameters are averaged; frozen parameters and buffers are copied.
        pairs = list(zip(self.model.parameters(), model.parameters()))
        self._avg = [(e, p) for e, p in pairs if p.requires_grad]
        self._copy = [(e, p) for e, p in pairs if not p.requires_grad]
        self._copy += list(zip(self.model.buffers(), model.buffers()))

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- ema + (1 - decay) * (model - ema), for the model this EMA was built from."""
        decay = self.current_decay()
        if self._avg:
            ema_params = [e for e, _ in self._avg]
            params = [p.detach() for _, p in self._avg]
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for e, p in self._copy:
            e.copy_(p)
        self.num_updates += 1

    def state_dict(self) -> dict[str, int]:
        """Counters only; the weights are saved as ``ema.safetensors`` by the checkpoint code."""
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.num_updates = int(state["num_updates"])
