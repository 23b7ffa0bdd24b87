"""The shared face of the objectives: ``loss(model, x0, y, generator) -> (B,)``.

An objective defines ``loss_terms`` (per-sample terms, each ``(B,)``, one of them ``"loss"``: what
training minimises; evaluation reads the others, e.g. the NELBO in nats) and inherits ``loss``.
Flow matching has a single term and defines ``loss`` directly.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class Objective:
    """Base class: ``loss`` is ``loss_terms(...)["loss"]``; subclasses define
    ``loss_terms(model, x0, y, generator=None, **given) -> dict[str, Tensor]``."""

    def loss(
        self,
        model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
        x0: Tensor,
        y: Tensor | None,
        generator: torch.Generator | None = None,
        **given: Tensor,
    ) -> Tensor:
        """Per-sample training loss ``(B,)`` (the objective's ``loss_terms`` say what it measures);
        ``given`` fixes random draws (``t``, ``noise``, ``z_t``) instead of drawing them."""
        return self.loss_terms(model, x0, y, generator, **given)["loss"]  # type: ignore[attr-defined]
