"""MaskDiT training (Zheng et al. 2023, "Fast Training of Diffusion Models with Masked Transformers",
arXiv 2306.09305): one wrapper for every continuous objective.

Each training image loses a random ``mask_ratio`` share of its patch tokens (default 0.5 in the
paper) before the DiT's encoder, so the encoder runs on the rest only (about half the cost of a
step at 0.5); a small decoder (``model.decoder_depth`` DiT blocks) sees every position again, with
a learned mask token where a patch was dropped (``models/dit.py``). The loss is

    L = L_objective(visible patches) + mae_weight * MSE(output, network input)(masked patches)

the objective's own denoising loss counted on the kept patches only (its ``loss_mask``), plus the
auxiliary task of reconstructing the dropped patches of the noisy input the network was given
(MaskDiT sec. 3.2, lambda = 0.1). Sampling never masks. ``set_mask_ratio(0)`` switches masking
off for the unmasking phase at the end of training (MaskDiT's "unmasking tuning", sec. 3.3; the
trainer does it for the last ``objective.unmask_fraction`` of the run), where the loss is the plain
objective's.

The kept patches of a global batch are drawn from the training generator first (before the
objective's own draws), ``global_draws`` included, so a torchrun run masks every sample as one
process does.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ditkit.diffusion.objective import masked_mean

__all__ = ["MaskedTokenTraining", "draw_kept_patches", "patch_mask_pixels"]


def draw_kept_patches(batch: int, num_patches: int, num_kept: int, generator: Optional[torch.Generator],
                      device: torch.device | str = "cpu") -> Tensor:
    """``(batch, num_kept)`` int64: per row ``num_kept`` distinct patch indices in ``[0, num_patches)``,
    sorted, uniformly at random (the first ``num_kept`` of a random permutation: argsort of uniforms)."""
    scores = torch.rand(batch, num_patches, generator=generator, device=generator.device if generator else device)
    return scores.argsort(dim=1)[:, :num_kept].sort(dim=1).values.to(device)


def patch_mask_pixels(keep: Tensor, grid: int, patch: int) -> Tensor:
    """``(B, 1, grid * patch, grid * patch)`` float: 1 on the pixels of the kept patches ``keep``
    ``(B, K)`` (row-major patch indices), 0 elsewhere."""
    B = keep.shape[0]
    flags = torch.zeros(B, grid * grid, device=keep.device).scatter(1, keep, 1.0)  # (B, N)
    return flags.view(B, 1, grid, 1, grid, 1).expand(B, 1, grid, patch, grid, patch).reshape(
        B, 1, grid * patch, grid * patch)


class MaskedTokenTraining:
    """A continuous objective (gaussian, flow, EDM) trained with MaskDiT token masking.

    Args:
        inner: the objective (its sampling, prior and denoiser are used unchanged).
        mask_ratio: share of patch tokens dropped per image, in [0, 1) (0: plain training).
        patch_size: the DiT's patch side (pixels or latent cells per token side).
        mae_weight: weight of the masked-patch reconstruction term (MaskDiT: 0.1).
    Raises ValueError for a ratio outside [0, 1) or a negative weight.
    """

    def __init__(self, inner: Any, mask_ratio: float, patch_size: int, mae_weight: float = 0.1) -> None:
        if mae_weight < 0:
            raise ValueError(f"mae_weight={mae_weight}: use a weight >= 0 (MaskDiT: 0.1)")
        self.inner, self.patch_size, self.mae_weight = inner, patch_size, mae_weight
        self.set_mask_ratio(mask_ratio)

    def set_mask_ratio(self, mask_ratio: float) -> None:
        """Change the share of dropped tokens (0 for the unmasking phase)."""
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio}: use a share in [0, 1) (MaskDiT: 0.5)")
        self.mask_ratio = mask_ratio

    def __getattr__(self, name: str) -> Any:  # sampling, prior, denoiser, family, ...: the objective's
        return getattr(self.__dict__["inner"], name)

    def _layout(self, x: Tensor) -> tuple[int, int]:
        """``(patches per image, patches kept)`` for images ``x`` (B, C, S, S)."""
        side = x.shape[-1]
        if x.ndim != 4 or x.shape[-2] != side or side % self.patch_size:
            raise ValueError(f"token masking needs square images (B, C, S, S) with S a multiple of {self.patch_size}; "
                             f"got {tuple(x.shape)}")
        n = (side // self.patch_size) ** 2
        return n, max(1, round(n * (1.0 - self.mask_ratio)))

    def loss(self, model: Callable[..., Tensor], x0: Tensor, y: Any, generator: torch.Generator | None = None,
             **given: Tensor) -> Tensor:
        return self.loss_terms(model, x0, y, generator, **given)["loss"]

    def loss_terms(self, model: Callable[..., Tensor], x0: Tensor, y: Any, generator: torch.Generator | None = None,
                   *, keep: Tensor | None = None, **given: Tensor) -> dict[str, Tensor]:
        """The objective's terms on the visible patches, plus ``"mae"`` ``(B,)`` (the masked
        patches' MSE against the network input) added to ``"loss"`` at ``mae_weight``. ``keep``
        ``(B, K)``: the kept patches, drawn from ``generator`` (before the objective's draws) unless
        given. With ``mask_ratio`` 0: the objective's terms unchanged."""
        if self.mask_ratio == 0.0:
            return self.inner.loss_terms(model, x0, y, generator, **given)
        n, k = self._layout(x0)
        if keep is None:
            keep = draw_kept_patches(x0.shape[0], n, k, generator, x0.device)
        visible = patch_mask_pixels(keep.to(x0.device), x0.shape[-1] // self.patch_size, self.patch_size)  # (B, 1, S, S)
        seen: dict[str, Tensor] = {}

        def net(x_in: Tensor, t: Tensor, y_: Any) -> Tensor:
            out = model(x_in, t, y_, keep=keep)
            # the dropped patches of what the network was given (x_t; c_in x_sigma for EDM), first C channels
            seen["mae"] = masked_mean((out[:, : x_in.shape[1]].float() - x_in.float()) ** 2, 1 - visible)
            return out

        terms = self.inner.loss_terms(net, x0, y, generator, loss_mask=visible, **given)
        terms["mae"] = seen["mae"]
        terms["loss"] = terms["loss"] + self.mae_weight * seen["mae"]
        return terms

    def global_draws(self, x: Tensor, global_batch: int, rows: slice, generator: torch.Generator) -> dict[str, Tensor]:
        """The kept patches of the global batch (drawn first, as ``loss_terms`` does), then the
        objective's own draws, each cut to this rank's ``rows``."""
        if self.mask_ratio == 0.0:
            return self.inner.global_draws(x, global_batch, rows, generator)
        n, k = self._layout(x)
        keep = draw_kept_patches(global_batch, n, k, generator, x.device)[rows]
        return {"keep": keep, **self.inner.global_draws(x, global_batch, rows, generator)}
