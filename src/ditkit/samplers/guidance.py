"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the network.

Guidance acts on the raw network output, so the same wrapper serves eps, v, velocity and logits.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["classifier_free_guidance"]


def _rows(y: Any) -> int:
    """Batch size of a condition: a tensor's first axis, or a ``PromptCondition``'s states'."""
    return int(getattr(y, "encoder_hidden_states", y).shape[0])


def _cat(a: Any, b: Any) -> Any:
    """Two conditions of one kind stacked along the batch (tensors, or ``PromptCondition.cat``)."""
    return type(a).cat([a, b]) if hasattr(a, "encoder_hidden_states") else torch.cat([a, b])


def classifier_free_guidance(
    model: Callable[[Tensor, Tensor, Any], Tensor],
    y: Any,
    cfg_scale: float,
    null_class: Optional[int] = None,
    guide_channels: int | None = None,
    on_branches: Optional[Callable[[Tensor, Tensor], None]] = None,
    *,
    y_null: Any = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Bind labels ``y`` ``(B,)`` and return ``net(x (B, ...), t (B,)) -> guided output (B, C_out, ...)``.

    Each call runs conditional and unconditional halves as ONE forward of batch ``2B`` (labels
    ``y`` then ``null_class``; or, for prompt models, any condition ``y`` -- caption ids (B, L) or a
    ``PromptCondition`` -- then the null condition ``y_null`` of the same kind and batch, e.g. the
    encoded empty or negative prompt) and returns ``uncond + cfg_scale * (cond - uncond)`` on the first
    ``guide_channels`` output channels (``None``: all); the remaining channels (e.g. the learned
    variance) are the conditional half's. The official DiT release guides 3 of its 4 latent eps
    channels (``guide_channels=3``); its FID numbers need that. ``on_branches(cond, uncond)``, if
    given, sees both halves ``(B, C_out, ...)`` of every call (e.g. to accumulate a guidance map).
    """
    if y is None:
        raise ValueError("classifier-free guidance needs class labels y; for an unconditional model use it directly")
    if (null_class is None) == (y_null is None):
        raise ValueError("classifier-free guidance needs exactly one of null_class (labels) or y_null (a null condition)")
    if y_null is not None and _rows(y_null) != _rows(y):
        raise ValueError(f"the null condition has {_rows(y_null)} rows for {_rows(y)} conditions")
    y_both = _cat(y, y_null) if y_null is not None else torch.cat([y, torch.full_like(y, null_class)])
    batch = _rows(y)

    def net(x: Tensor, t: Tensor) -> Tensor:
        if x.shape[0] != batch:
            raise ValueError(f"batch of x ({x.shape[0]}) differs from the bound labels ({batch})")
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
