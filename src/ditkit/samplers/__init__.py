"""Samplers: pure functions of a denoiser callable; they import torch only (never a model or
``ditkit.diffusion``). See docs/architecture.md for the signatures and the time convention."""

from ditkit.samplers.autoregressive import autoregressive
from ditkit.samplers.flow import euler, flow_timesteps, heun
from ditkit.samplers.gaussian import ddim, ddpm, dpm_solver_pp_2m
from ditkit.samplers.guidance import classifier_free_guidance
from ditkit.samplers.masked import ancestral, canvas, gumbel_argmax, semi_autoregressive
from ditkit.samplers.noise import randn, randn_like

__all__ = [
    "ancestral",
    "autoregressive",
    "canvas",
    "classifier_free_guidance",
    "gumbel_argmax",
    "semi_autoregressive",
    "ddim",
    "ddpm",
    "dpm_solver_pp_2m",
    "euler",
    "flow_timesteps",
    "heun",
    "randn",
    "randn_like",
]
