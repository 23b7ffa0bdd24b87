"""DPM-Solver++(3M): the third-order multistep DPM-Solver++ for Gaussian diffusion (issue 21).

Same time convention, grid and denoiser as ``ditkit.samplers.gaussian`` (a trailing index 0 of
``timesteps`` is the data end, so ``space_timesteps(T, n + 1)`` gives ``n`` network calls); the
update itself is ``dpm_solver_pp_multistep`` with ``order=3``, shared with DPM-Solver++(2M).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ditkit.registry import SAMPLERS
from ditkit.samplers.gaussian import Callback, Denoiser, dpm_solver_pp_multistep
from ditkit.samplers.noise import GeneratorArg

__all__ = ["dpm_solver_pp_3m"]


@SAMPLERS.register("dpm++3m", family="gaussian", options=(), zero_is_data=True)
def dpm_solver_pp_3m(
    denoiser: Denoiser,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Sequence[int] | Tensor,
    *,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, arXiv 2211.01095): third-order multistep on the data prediction.

    ``x_T`` ``(B, ...)`` at ``timesteps[0]`` -> data ``(B, ...)``. The first two steps are first and
    second order (no history yet), the last two second and first order (the last one goes to
    ``sigma = 0``); the rest third order. Deterministic: ``generator`` is ignored. Raises
    ``ValueError`` for an empty, unordered or out-of-range ``timesteps``.
    """
    return dpm_solver_pp_multistep(denoiser, x_T, alphas_cumprod, timesteps, order=3, callback=callback)
