"""Objectives: ``loss(model, x0, y) -> (B,)`` and ``denoiser(net)`` adapters for the samplers.

Time convention (one place, docs/architecture.md): data at ``t = 0``. Gaussian objectives use the
integer index ``t in {0..T-1}``; flow matching uses ``t in [0, 1]`` and calls the network with
``1000 * t``.
"""

from ditkit.diffusion.autoregressive import AutoregressiveLM
from ditkit.diffusion.flow import FlowMatching
from ditkit.diffusion.gaussian import GaussianDiffusion, GaussianPrediction
from ditkit.diffusion.masked import MaskedDiffusion, log_linear_alpha, stratified_times, subs_log_probs
from ditkit.diffusion.schedules import (
    GaussianSchedule,
    cosine_betas,
    linear_betas,
    make_schedule,
    space_timesteps,
)

__all__ = [
    "AutoregressiveLM",
    "FlowMatching",
    "MaskedDiffusion",
    "log_linear_alpha",
    "stratified_times",
    "subs_log_probs",
    "GaussianDiffusion",
    "GaussianPrediction",
    "GaussianSchedule",
    "cosine_betas",
    "linear_betas",
    "make_schedule",
    "space_timesteps",
]
