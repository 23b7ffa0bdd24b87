"""Samplers for masked (absorbing-state) diffusion over tokens. Pure functions; torch only.

A denoiser is ``fn(z_t (B, L) int64, t (B,) float in [0, 1]) -> (B, L, V + 1)`` log-probabilities of
the clean token under SUBS (``MaskedDiffusion.denoiser``): ``-inf`` on the mask id ``V``, one-hot at
clean positions. Time runs from ``t = 1`` (all generated positions masked) to ``t = 0``.

Fixed positions (a prompt, a suffix, any infill pattern) are simply tokens that are not the mask in
the input ``x``: the samplers only ever write to masked positions, so they come out untouched.

``generator`` is ``None``, one ``torch.Generator``, or a list of ``B`` generators (one per row, so a
batch equals the same rows sampled one at a time). Categorical draws use the Gumbel-max trick with
float64 noise: float32 Gumbel noise truncates the tail and lowers the effective temperature
(Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic masked models and exploit
inaccurate categorical sampling").
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ditkit.registry import SAMPLERS
from ditkit.samplers.noise import GeneratorArg as Generator

__all__ = ["ancestral", "semi_autoregressive", "canvas", "gumbel_argmax", "uniform"]

Denoiser = Callable[[Tensor, Tensor], Tensor]


def uniform(shape: Sequence[int], generator: Generator, device: torch.device | str) -> Tensor:
    """float64 ``U[0, 1)`` draws of ``shape``; with a list of generators row ``b`` comes from ``generator[b]``."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per row")
        rows = [torch.rand(tuple(shape[1:]), generator=g, device=g.device, dtype=torch.float64) for g in generator]
        return torch.stack(rows).to(device)
    on = generator.device if generator is not None else torch.device(device)
    return torch.rand(tuple(shape), generator=generator, device=on, dtype=torch.float64).to(device)


def gumbel_argmax(logp: Tensor, generator: Generator = None, temperature: float = 1.0) -> Tensor:
    """Sample ``(...)`` int64 from ``Cat(softmax(logp / temperature))`` over the last axis of ``logp``
    by ``argmax(logp / temperature + g)``, ``g = -log(-log u)`` in float64; temperature 0 is argmax."""
    if temperature == 0:
        return logp.argmax(-1)
    u = uniform(logp.shape, generator, logp.device)
    gumbel = -torch.log(-torch.log(u))  # u = 0 gives -inf: never chosen, never NaN
    return (logp.double() / temperature + gumbel).argmax(-1)


def canvas(
    length: int,
    mask_id: int,
    batch_size: int = 1,
    *,
    prefix: Tensor | None = None,
    suffix: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``(B, length)`` int64 of mask ids with an optional fixed ``prefix`` / ``suffix`` (``(P,)`` or
    ``(B, P)``): the input of ``ancestral`` for unconditional generation, prompts and infilling."""
    x = torch.full((batch_size, length), mask_id, dtype=torch.long, device=device)
    n_pre = 0 if prefix is None else prefix.shape[-1]
    n_suf = 0 if suffix is None else suffix.shape[-1]
    if n_pre + n_suf > length:
        raise ValueError(f"prefix ({n_pre}) + suffix ({n_suf}) tokens do not fit in length {length}")
    if prefix is not None:
        x[:, :n_pre] = prefix.to(device)
    if suffix is not None and n_suf:
        x[:, length - n_suf :] = suffix.to(device)
    return x


@SAMPLERS.register("ancestral", family="masked", options=("remasking", "temperature", "remdm_eta", "remdm_schedule"))
@torch.no_grad()
def ancestral(
    denoiser: Denoiser,
    x: Tensor,
    num_steps: int,
    *,
    mask_id: int,
    remasking: str = "random",
    cache: bool = False,
    temperature: float = 1.0,
    remdm_eta: float = 0.0,
    remdm_schedule: str = "cap",
    generator: Generator = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Masked-diffusion ancestral sampling (MDLM, Sahoo et al. 2024, SUBS reverse step); ``x`` ``(B, L)``
    with ``mask_id`` where tokens are to be generated -> ``(B, L)`` with no mask left.

    ``num_steps`` uniform steps ``t -> s`` from 1 to 0. ``remasking="random"``: each masked position
    is revealed with probability ``(alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t`` (log-linear
    schedule), its token drawn from the denoiser. ``remasking="low_confidence"``: a token is proposed
    at every masked position and the most probable proposals are kept, as many as bring the masked
    count to ``floor(M_0 s)`` (MaskGIT, Chang et al. 2022; LLaDA, Nie et al. 2025).
    ``cache=True`` reuses the denoiser output when no token changed in the previous step -- exact
    when the model ignores ``t`` (MDLM's cached sampler); the random draws are the same
    either way, so with such a model both give identical samples. ``callback(i, x, x0_argmax)``.

    ``remdm_eta > 0`` (with ``remasking="random"``): ReMDM (Wang et al. 2025, arXiv 2503.00307,
    eq. 8), which may remask a token it generated earlier, so a wrong token can be fixed later. With
    ``alpha_t = 1 - t`` a generated token is remasked with probability ``sigma_t`` and a masked one
    revealed with ``(alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t)``; ``sigma_t`` is at most
    ``sigma_max = min(1, (1 - alpha_s) / alpha_t)`` (so the marginals stay those of the forward
    process): ``remdm_schedule="cap"`` uses ``min(remdm_eta, sigma_max)``, ``"rescale"``
    ``remdm_eta * sigma_max`` (``remdm_eta <= 1``). The last step (``s = 0``) remasks nothing, so no
    mask is left. Fixed tokens (prompt, template) are never remasked. ``remdm_eta = 0`` is MDLM.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if remasking not in ("random", "low_confidence"):
        raise ValueError(f"remasking={remasking!r}: choose 'random' or 'low_confidence'")
    if remdm_eta < 0 or remdm_schedule not in ("cap", "rescale") or (remdm_schedule == "rescale" and remdm_eta > 1):
        raise ValueError(f"ReMDM: need remdm_eta >= 0 (<= 1 to rescale) and remdm_schedule 'cap' or 'rescale', "
                         f"got {remdm_eta}, {remdm_schedule!r}")
    if remdm_eta > 0 and remasking != "random":
        raise ValueError("ReMDM remasking (remdm_eta > 0) follows the random reveal schedule: use remasking='random'")
    x = x.clone()
    B, L = x.shape
    ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    generated = x == mask_id  # positions the sampler writes (ReMDM may remask only these)
    initial_masked = generated.sum(1)
    logp = None
    for i in range(num_steps):
        t, s = ts[i], ts[i + 1]
        masked = x == mask_id
        if logp is None or not cache:
            logp = denoiser(x, torch.full((B,), t, device=x.device))
        remask = None
        if remasking == "random" and remdm_eta > 0:
            sigma_max = min(1.0, s / (1.0 - t)) if t < 1.0 else 1.0  # (1 - alpha_s) / alpha_t
            sigma = min(remdm_eta, sigma_max) if remdm_schedule == "cap" else remdm_eta * sigma_max
            u = uniform((B, L), generator, x.device)
            reveal = masked & (u < ((1.0 - s) - (1.0 - sigma) * (1.0 - t)) / t)
            remask = generated & ~masked & (u < sigma)
            proposal = gumbel_argmax(logp, generator, temperature)
        elif remasking == "random":
            reveal = masked & (uniform((B, L), generator, x.device) < (t - s) / t)
            proposal = gumbel_argmax(logp, generator, temperature)
        else:
            proposal = gumbel_argmax(logp, generator, temperature)
            confidence = logp.gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
            confidence = torch.where(masked, confidence, torch.full_like(confidence, -math.inf))
            num_reveal = masked.sum(1) - torch.floor(initial_masked * s).long()  # (B,)
            rank = confidence.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
            reveal = masked & (rank < num_reveal.unsqueeze(1))
        x = torch.where(reveal, proposal, x)
        if remask is not None:
            x = torch.where(remask, torch.full_like(x, mask_id), x)
            reveal = reveal | remask
        if reveal.any():
            logp_used, logp = logp, None  # a token changed: the next step needs a fresh output
        else:
            logp_used = logp
        if callback is not None:
            callback(i, x, logp_used.argmax(-1))
    return x


@torch.no_grad()
def semi_autoregressive(
    denoiser: Denoiser,
    prompt: Tensor,
    total_length: int,
    *,
    window: int,
    stride: int,
    num_steps: int,
    mask_id: int,
    step_callback: Callable[[int, Tensor], None] | None = None,
    **sampler_kwargs: object,
) -> Tensor:
    """Generate ``(B, total_length)`` tokens, longer than the training window (MDLM's semi-AR sampler).

    The first window is filled after the ``prompt`` ``(B, P)`` (``P`` may be 0). Each later window
    keeps the last ``window - stride`` generated tokens as a fixed prefix and samples ``stride`` new
    ones with ``ancestral`` (``sampler_kwargs``: remasking, cache, temperature, generator).
    ``step_callback(k, tokens)`` after every ancestral step, ``k = w * num_steps + i`` counted over
    the windows, ``tokens`` ``(B, l)`` everything generated before window ``w`` followed by its
    current state (masked positions still ``mask_id``).
    """
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    out, w = prompt, 0
    while out.shape[1] < total_length:
        keep = out.shape[1] if out.shape[1] < window else window - stride
        context = out[:, out.shape[1] - keep :]
        new = min(window - keep, total_length - out.shape[1])
        x = canvas(keep + new, mask_id, out.shape[0], prefix=context, device=out.device)
        on_step = None
        if step_callback is not None:
            def on_step(i: int, x_i: Tensor, _x0: Tensor, w: int = w, done: Tensor = out[:, : out.shape[1] - keep]) -> None:
                step_callback(w * num_steps + i, torch.cat([done, x_i], 1))
        x = ancestral(denoiser, x, num_steps, mask_id=mask_id, callback=on_step, **sampler_kwargs)  # type: ignore[arg-type]
        out = torch.cat([out, x[:, keep:]], dim=1)
        w += 1
    return out[:, :total_length]
