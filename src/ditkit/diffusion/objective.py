"""The shared face of the objectives.

An objective is registered in ``ditkit.registry.OBJECTIVES`` under the ``objective.kind`` that
selects it, with meta ``modality`` ("image", "text", ...) and ``family`` (the sampler family its
denoiser serves, see ``ditkit.registry.SAMPLERS``)::

    @OBJECTIVES.register("edm", modality="image", family="edm")
    class EDM(Objective): ...

It provides:

* ``from_config(cfg, **overrides)`` (classmethod): build it from a full ``Config`` (read
  duck-typed; ``diffusion/`` does not import the config module).
* ``loss_terms(model, x0, y, generator=None, **given) -> dict[str, Tensor]``: per-sample terms,
  each ``(B,)``, one of them ``"loss"`` (what training minimises); ``loss`` is inherited.
  ``given`` fixes the random draws (``t``, ``noise``, ``z_t``) instead of drawing them. The
  continuous objectives (gaussian, flow, EDM) also take ``loss_mask`` (broadcastable to ``x0``,
  1 = counted): their error terms average over the counted elements only (``masked_mean``; MaskDiT's
  loss on the visible patches, ``diffusion/masking.py``).
* ``global_draws(x, global_batch, rows, generator) -> dict``: the random inputs ``loss`` would draw
  for a global batch of ``global_batch`` samples, cut to this rank's ``rows`` (torchrun: every rank
  draws the same global stream and keeps its rows, so results do not depend on the world size).
* ``denoiser(net)``: adapts the raw network ``net(x, t) -> out`` (conditioning bound) to the call
  its sampler family expects.
* ``sample(sampler, net, x_T, num_steps, *, generator=None, callback=None, **options) -> x0``:
  build the family's grid (timesteps, times or sigmas) for ``num_steps`` and run ``sampler``
  (a function registered in ``SAMPLERS`` with this objective's family) from ``x_T``.
* ``prior(shape, generators, device)``: the starting noise ``x_T`` of sampling (per-sample seeded).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Objective", "masked_mean"]


def masked_mean(err: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample mean ``(B, ...) -> (B,)`` over the elements where ``mask`` (broadcastable to
    ``err``, 0 or 1) is 1; the plain mean over all non-batch dimensions without a mask."""
    if mask is None:
        return err.flatten(1).mean(1)
    weight = mask.to(err.dtype).expand_as(err)
    return (err * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)


class Objective:
    """Base class: ``loss`` is ``loss_terms(...)["loss"]``; subclasses define the rest (see the
    module docstring)."""

    family: str = ""
    default_sampler: str = ""  # what sample.sampler "auto" means for this objective
    timestep_spacings: tuple[str, ...] = ()  # grid spacings ``sample`` takes (gaussian: uniform, quadratic)

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

    def prior(
        self,
        shape: Sequence[int],
        generators: torch.Generator | Sequence[torch.Generator],
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """``x_T`` of shape ``shape``: standard normal, row ``i`` drawn from ``generators[i]`` (or
        the whole batch from one generator); noise-scale families such as EDM scale it by their
        largest sigma."""
        if isinstance(generators, torch.Generator):
            return torch.randn(tuple(shape), generator=generators, device=generators.device).to(device)
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generators]
        return torch.stack(rows).to(device)

    def sample(
        self,
        sampler: Callable[..., Tensor],
        net: Callable[[Tensor, Tensor], Tensor],
        x_T: Tensor,
        num_steps: int,
        *,
        generator: Optional[Any] = None,
        callback: Optional[Callable[..., None]] = None,
        **options: Any,
    ) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no image sampling; use its own sampler")
