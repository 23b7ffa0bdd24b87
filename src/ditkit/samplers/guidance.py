"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the network.

Guidance acts on the raw network output, so the same wrapper serves eps, v, velocity and logits.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["classifier_free_guidance"]


def classifier_free_guidance(
    model: Callable[[Tensor, Tensor, Tensor], Tensor],
    y: Tensor,
    cfg_scale: float,
    null_class: int,
    guide_channels: int | None = None,
    on_branches: Optional[Callable[[Tensor, Tensor], None]] = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Bind labels ``y`` ``(B,)`` and return ``net(x (B, ...), t (B,)) -> guided output (B, C_out, ...)``.

    Each call runs conditional and unconditional halves as ONE forward of batch ``2B`` (labels
    ``y`` then ``null_class``) and returns ``uncond + cfg_scale * (cond - uncond)`` on the first
    ``guide_channels`` output channels (``None``: all); the remaining channels (e.g. the learned
    variance) are the conditional half's. The official DiT release guides 3 of its 4 latent eps
    channels (``guide_channels=3``); its FID numbers need that. ``on_branches(cond, uncond)``, if
    given, sees both halves ``(B, C_out, ...)`` of every call (e.g. to accumulate a guidance map).
    """
    if y is None:
        raise ValueError("classifier-free guidance needs class labels y; for an unconditional model use it directly")
    y_both = torch.cat([y, torch.full_like(y, null_class)])

    def net(x: Tensor, t: Tensor) -> Tensor:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"batch of x ({x.shape[0]}) differs from the bound labels ({y.shape[0]})")
        out = model(torch.cat([x, x]), torch.cat([t, t]), y_both)
        cond, uncond = out.chunk(2)
        if on_branches is not None:
            on_branches(cond, uncond)
        k = cond.shape[1] if guide_channels is None else guide_channels
        if not 0 < k <= cond.shape[1]:
            raise ValueError(f"guide_channels={guide_channels} must be in [1, {cond.shape[1]}] (output channels)")
        guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)

    return net
