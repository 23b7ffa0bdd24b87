"""Exponential moving average of the weights (Polyak averaging), the weights DiT samples with.

``ema = decay * ema + (1 - decay) * weights`` after each optimiser step, done as one fused
``_foreach_lerp_`` over all tensors. With warm-up the decay after ``n`` updates is
``min(decay, (1 + n) / (10 + n))`` (the TensorFlow ExponentialMovingAverage ``num_updates`` rule),
so a short run's EMA is not dominated by the random initial weights.

With ``power=gamma`` the decay is instead the power-function profile of Karras et al. 2024
("Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2, arXiv 2312.02696,
Sec. 3.1): ``beta(t) = (1 - 1/t)^(gamma + 1)`` at update ``t = n + 1`` (so the first update copies
the weights), capped at ``decay``. The average then weighs the weights of step ``s`` by about
``s^gamma``: its length grows with training (``gamma = 0`` is the plain mean of every iterate), so it
leaves the initial weights at any run length. ``power_from_sigma_rel`` turns EDM2's relative
width ``sigma_rel`` (e.g. 0.05 or 0.10) into ``gamma``.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn

__all__ = ["EMA", "power_from_sigma_rel", "sigma_rel_of_power"]


def sigma_rel_of_power(gamma: float) -> float:
    """EDM2's relative standard deviation of the power-function EMA profile of exponent ``gamma``
    (Karras et al. 2024, eq. 3): ``sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3))``."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def power_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent ``gamma >= 0`` whose profile has relative width ``sigma_rel`` (inverse of
    ``sigma_rel_of_power``; EDM2: 0.10 -> 6.94, 0.05 -> 16.97). ``sigma_rel`` must lie in
    ``(0, 1/sqrt(12)]`` (``gamma = 0``, the plain mean); ``ValueError`` otherwise.

    Bisection on ``[0, 1e9]``, where ``sigma_rel_of_power`` is decreasing."""
    if not 0 < sigma_rel <= sigma_rel_of_power(0.0):
        raise ValueError(f"sigma_rel must lie in (0, {sigma_rel_of_power(0.0):.4f}], got {sigma_rel}")
    lo, hi = 0.0, 1e9
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sigma_rel_of_power(mid) > sigma_rel else (lo, mid)
    return 0.5 * (lo + hi)


class EMA:
    """Holds a frozen copy of ``model`` (``self.model``, eval mode) and updates it in place.

    Args:
        decay: the largest decay (0.9999 in DiT).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (ignored with ``power``).
        power: if set, the power-function decay ``min(decay, (n / (n + 1))^(power + 1))`` (EDM2);
            must be >= 0 (``ValueError`` otherwise). None (default): the rules above.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, power: Optional[float] = None):
        if power is not None and not power >= 0:
            raise ValueError(f"EMA power must be >= 0 (EDM2 uses 6.94 or 16.97), got {power}")
        self.decay, self.warmup, self.power = decay, warmup, power
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0
        # Trainable parameters are averaged; frozen parameters and buffers are copied.
        pairs = list(zip(self.model.parameters(), model.parameters()))
        self._avg = [(e, p) for e, p in pairs if p.requires_grad]
        self._copy = [(e, p) for e, p in pairs if not p.requires_grad]
        self._copy += list(zip(self.model.buffers(), model.buffers()))

    def current_decay(self) -> float:
        """The decay the next update will use."""
        n = self.num_updates
        if self.power is not None:  # beta(t) = (1 - 1/t)^(gamma + 1) at t = n + 1 (EDM2, Sec. 3.1)
            return min(self.decay, (n / (n + 1)) ** (self.power + 1))
        if not self.warmup:
            return self.decay
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
