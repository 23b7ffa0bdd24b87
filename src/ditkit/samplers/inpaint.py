"""Inpainting (RePaint-style replacement) and image-to-image (SDEdit) for every sampler family.

One wrapper serves every registered Gaussian, flow and EDM sampler: it wraps the family's
*denoiser*, not the sampler, so no sampler has inpainting code. Per family, a small
``FamilyAdapter`` says how that family writes a noise level (``docs/architecture.md``):

====================  ==========================  ===============================  ====================
family                level passed to denoiser    ``add_noise(x0, noise, level)``  data prediction
====================  ==========================  ===============================  ====================
``gaussian``          DDPM index ``t`` (B,) int64  ``sqrt(abar) x0 + sqrt(1-abar) n``  ``out.x0``
``flow``              ``t`` in (0, 1] (B,) float   ``(1 - t) x0 + t n``             ``x - t v``
``edm``               ``sigma`` (B,) float         ``x0 + sigma n``                 ``out`` (it is x0)
====================  ==========================  ===============================  ====================

Inpainting (Lugmayr et al. 2022, "RePaint", Sec. 4.1, eq. 8): ``mask`` is 1 (white) where the image
is to be regenerated and 0 where the original ``image`` is kept. At every network call at level
``l`` the wrapped denoiser

1. replaces the known region of its input by the original forward-noised to ``l`` with fresh noise
   (RePaint's ``x_known ~ q(x_l | x_0)``), so the network sees a consistent noisy image;
2. replaces the known region of the network's data prediction by the original, and rewrites the
   family's other outputs there (``eps`` or ``v``) to agree with it *at the sampler's own state*
   ``x``, so that whatever update the sampler makes from ``(x, x0, eps / v)`` moves the known
   region of its state along a forward path of the original (callbacks see the original as x0).

After the sampler returns, the known region is pasted from ``image`` (exact equality).

Limits (say them to users):

* The replacement is an approximation of conditional sampling, not exact: the unknown region is
  denoised with ``E[x0 | noisy known, noisy unknown]`` where the noisy known part is a *random*
  forward draw, while the exact conditional needs ``E[x0 | clean known, noisy unknown]``. When the
  known and unknown regions are independent it is exact; when they are strongly correlated the
  unknown part is pulled less toward the conditional than it should be (on the 4-D Gaussian of
  tests/test_inpaint.py, correlations 0.6-0.8, one unknown dim's mean lands 0.6 (ddpm) to 0.8
  (ddim, heun) conditional standard deviations from the exact conditional mean, against 1.1 for
  no conditioning at all). Exact answers need particle methods (e.g. SMCDiff, TDS), which this
  is not.
* RePaint's resampling "jumps" are an option (``jump_length``, ``jump_n_sample``; next section), at
  the price of more network calls and of the user's sampler's own steps (below).
* Only samplers that update each element from ``x`` and the (pasted) prediction at the same
  position are kept consistent; every sampler in ``ditkit.samplers`` is of that kind.

Resampling jumps (RePaint, Sec. 4.2 and Alg. 1): going down the grid, at every ``jump_length``-th
level the state is noised back up ``jump_length`` levels and those are denoised again,
``jump_n_sample - 1`` times, so that the unknown region is re-harmonised with the known region
(``resample_schedule``; the time schedule of the paper's code). Every family writes its state as
``x_l = a_l x0 + s_l n`` (``FamilyAdapter.scales``: gaussian ``(sqrt(abar), sqrt(1 - abar))``, flow
``(1 - t, t)``, edm ``(1, sigma)``; the data level is ``(1, 0)``), so one pair of moves serves all
three families:

* down ``l -> l'`` (one network call): RePaint's ancestral step, the Gaussian posterior
  ``q(x_l' | x_l, x0 = x0_hat)`` written with ``a = a_l / a_l'``, ``tau^2 = s_l^2 - a^2 s_l'^2``:
  mean ``(a s_l'^2 / s_l^2) x_l + (a_l' tau^2 / s_l^2) x0_hat``, variance ``tau^2 s_l'^2 / s_l^2``
  (``ancestral_step``; for gaussian it is DDPM's ``q(x_{t-1} | x_t, x0)``, Ho et al. 2020, eq. 7);
* up ``l' -> l`` (no call): the forward transition ``x_l = a x_l' + sqrt(s_l^2 - a^2 s_l'^2) n``
  (``forward_jump``).

With jumps the user's sampler only chooses the grid of levels (``timesteps`` / ``ts`` /
``sigmas`` and their spacing); its own update rule and options (``eta``, learned variance, second
order, churn) are not used: a sampler that always runs to the data (every gaussian one) cannot
stop at the intermediate level a jump starts from, so the descent is the ancestral step above for
every family. ``jump_n_sample = 1`` (the default) runs the user's sampler unchanged. Cost:
``resample_num_calls`` network calls instead of ``n`` (RePaint's ``j = r = 10`` on 250 levels:
2,410 calls, 9.6x; the 2,160 jumps back up cost no call). Effect, measured on the 4-D Gaussian
of tests/test_inpaint.py (tests/test_inpaint_jumps.py, docs/control.md): ``j = r = 5`` on 50
levels cuts the distance of the unknown mean from the exact conditional mean to 0.3-0.5 of its plain value
for all three families; it needs grid levels where the noise is comparable to the data's scale
(on an EDM grid linear in sigma it did nothing).

SDEdit (Meng et al. 2022, Sec. 3): ``sdedit_start`` cuts the grid to its last ``strength`` part and
noises the user's image to the first kept level; the sampler then runs from there.

Imports only torch, ``ditkit.errors`` and ``ditkit.samplers.noise`` (tests/test_layering.py).

Latent models: encode ``image`` with the VAE first and resize ``mask`` to the latent grid (a latent
cell is "regenerate" if any of its pixels is, i.e. max-pooling by ``vae_downsample``); the final
paste then happens on latents, so the decoded known region is the VAE round trip of the original.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ditkit.errors import ConfigError
from ditkit.samplers.noise import GeneratorArg, randn_like

__all__ = [
    "FamilyAdapter",
    "adapter_for",
    "ancestral_step",
    "check_jumps",
    "edm_adapter",
    "flow_adapter",
    "forward_jump",
    "gaussian_adapter",
    "inpaint",
    "inpaint_denoiser",
    "prepare_mask",
    "resample_num_calls",
    "resample_schedule",
    "sdedit_start",
]

Grid = Sequence[float] | Sequence[int] | Tensor


@dataclass(frozen=True)
class FamilyAdapter:
    """How one sampler family writes noise levels; ``level`` is what its denoiser receives, ``(B,)``.

    Fields:
        family: ``"gaussian"``, ``"flow"`` or ``"edm"``.
        add_noise: ``(x0, noise, level) -> x`` at that level (the forward process).
        x0_from_prediction: ``(out, x, level) -> x0`` estimate from the denoiser's output ``out``.
        with_known_x0: ``(out, x, level, x0, keep) -> out'``: the output the family's samplers
            read, rewritten where ``keep == 1`` to carry data prediction ``x0`` at the sampler's
            state ``x`` (``eps`` / ``v`` recomputed from ``x`` and ``x0`` there); unchanged where
            ``keep == 0``.
        prior_std: ``first level -> std of x_T`` (1 for gaussian and flow, ``sigma_max`` for edm).
        grid_ends_at_data: the grid's last entry is the data level (flow ``t = 0``, edm
            ``sigma = 0``), never passed to the denoiser; ``False`` for Gaussian timesteps, whose
            data level follows the last entry.
        scales: ``level (B,) -> (a, s)``, two ``(B,)`` float64 tensors with ``x_l = a x0 + s n``
            (what ``add_noise`` computes); used by the resampling jumps.
    """

    family: str
    add_noise: Callable[[Tensor, Tensor, Tensor], Tensor]
    x0_from_prediction: Callable[[Any, Tensor, Tensor], Tensor]
    with_known_x0: Callable[[Any, Tensor, Tensor, Tensor, Tensor], Any]
    prior_std: Callable[[float], float]
    grid_ends_at_data: bool
    scales: Callable[[Tensor], tuple[Tensor, Tensor]]


def _col(level: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` per-sample values as ``(B, 1, ..., 1)`` in ``like``'s dtype and device."""
    return level.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def gaussian_adapter(alphas_cumprod: Tensor) -> FamilyAdapter:
    """Adapter for the ``gaussian`` family: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
    (Ho et al. 2020, eq. 4); ``alphas_cumprod`` is the float64 ``(T,)`` training table."""
    table = alphas_cumprod.double().cpu()

    def abar(t: Tensor, like: Tensor) -> Tensor:
        return _col(table[t.long().cpu()], like)

    def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a = abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def with_known_x0(out: Any, x: Tensor, t: Tensor, x0: Tensor, keep: Tensor) -> Any:
        a = abar(t, x)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # the eps that x and x0 imply (eq. 4 solved)
        x0 = keep * x0 + (1 - keep) * out.x0
        eps = keep * eps + (1 - keep) * out.eps
        if dataclasses.is_dataclass(out):  # GaussianPrediction: keep var_frac as it is
            return dataclasses.replace(out, x0=x0, eps=eps)
        return type(out)(**{**vars(out), "x0": x0, "eps": eps})

    def scales(t: Tensor) -> tuple[Tensor, Tensor]:
        a = table[t.long().cpu()]
        return a.sqrt(), (1 - a).sqrt()

    return FamilyAdapter("gaussian", add_noise, lambda out, x, t: out.x0, with_known_x0, lambda _: 1.0, False, scales)


def flow_adapter() -> FamilyAdapter:
    """Adapter for the ``flow`` family: ``x_t = (1 - t) x0 + t eps``, velocity ``eps - x0``, so
    ``x0 = x_t - t v`` and ``v = (x_t - x0) / t`` (the samplers never call at ``t = 0``)."""

    def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        tt = _col(t, x0)
        return (1 - tt) * x0 + tt * noise

    return FamilyAdapter(
        "flow",
        add_noise,
        lambda v, x, t: x - _col(t, x) * v,
        lambda v, x, t, x0, keep: keep * (x - x0) / _col(t, x) + (1 - keep) * v,
        lambda _: 1.0,
        True,
        lambda t: (1 - t.double().cpu(), t.double().cpu()),
    )


def edm_adapter() -> FamilyAdapter:
    """Adapter for the ``edm`` family (Karras et al. 2022): ``x = x0 + sigma n``; the denoiser's
    output is the x0 estimate itself."""
    return FamilyAdapter(
        "edm",
        lambda x0, noise, sigma: x0 + _col(sigma, x0) * noise,
        lambda out, x, sigma: out,
        lambda out, x, sigma, x0, keep: keep * x0 + (1 - keep) * out,
        lambda sigma_max: float(sigma_max),
        True,
        lambda sigma: (torch.ones_like(sigma, dtype=torch.float64, device="cpu"), sigma.double().cpu()),
    )


def adapter_for(family: str, alphas_cumprod: Tensor | None = None) -> FamilyAdapter:
    """The adapter of a sampler family (``ditkit.registry.SAMPLERS`` meta ``family``)."""
    if family == "gaussian":
        if alphas_cumprod is None:
            raise ConfigError("inpainting with a gaussian sampler needs the objective's alphas_cumprod")
        return gaussian_adapter(alphas_cumprod)
    if family == "flow":
        return flow_adapter()
    if family == "edm":
        return edm_adapter()
    raise ConfigError(f"inpainting and image-to-image work with gaussian, flow and edm samplers, not {family!r}")


def prepare_mask(mask: Tensor, image: Tensor) -> tuple[Tensor, str | None]:
    """Check a regeneration mask against ``image`` ``(B, C, H, W)`` (or any ``(B, ...)``).

    ``mask`` must broadcast to ``image.shape`` without changing it (e.g. ``(B, 1, H, W)``,
    ``(1, 1, H, W)``, or the image's shape); 1 / white = regenerate, 0 / black = keep.

    Returns ``(mask, note)``: the mask as 0/1 in ``image``'s dtype, broadcast to ``image.shape``,
    and ``None``, or a one-line note to show the user when the mask was not binary and was
    thresholded at 0.5 (values ``>= 0.5`` regenerate).

    Raises:
        ConfigError: shapes do not fit; a sample's mask is all 0 (nothing to regenerate) or all 1
            (nothing kept: use plain sampling); NaN values.
    """
    try:
        fits = torch.broadcast_shapes(mask.shape, image.shape) == image.shape
    except RuntimeError:
        fits = False
    if not fits or mask.ndim > image.ndim:
        raise ConfigError(
            f"mask of shape {tuple(mask.shape)} does not fit the image {tuple(image.shape)}: "
            "give the mask the image's height and width (one channel or the image's channels)"
        )
    mask = mask.to(image.device, torch.float64)
    if torch.isnan(mask).any():
        raise ConfigError("mask has NaN values: use 1 (white) to regenerate and 0 (black) to keep")
    binary = bool(((mask == 0) | (mask == 1)).all())
    note = None
    if not binary:
        note = "mask is not binary: thresholded at 0.5 (values >= 0.5 are regenerated, the rest kept)"
    mask = (mask >= 0.5).to(image.dtype).expand(image.shape).contiguous()
    per_sample = mask.reshape(mask.shape[0], -1).mean(1)
    if bool((per_sample == 0).any()):
        raise ConfigError("mask is all black (keep everything) for a sample: paint white where to regenerate")
    if bool((per_sample == 1).any()):
        raise ConfigError("mask is all white (nothing kept) for a sample: sample without --mask instead")
    return mask, note


def inpaint_denoiser(
    denoiser: Callable[[Tensor, Tensor], Any],
    adapter: FamilyAdapter,
    image: Tensor,
    mask: Tensor,
    *,
    generator: GeneratorArg = None,
) -> Callable[[Tensor, Tensor], Any]:
    """Wrap ``denoiser(x (B, ...), level (B,))`` for RePaint-style inpainting (module docstring).

    Args:
        image: ``(B, ...)`` the original in the model's space (pixels in [-1, 1] or latents).
        mask: ``(B, ...)`` 0/1 from ``prepare_mask``: 1 = regenerate.
        generator: the fresh noise of the known region at every call (``None``, one generator, or
            ``B`` generators: see ``ditkit.samplers.noise``).

    Returns:
        ``denoiser'`` with the family's call signature; its data prediction equals ``image`` on the
        known region.
    """
    keep, regenerate = 1 - mask, mask.bool()

    def wrapped(x: Tensor, level: Tensor) -> Any:
        known = adapter.add_noise(image.to(x.dtype), randn_like(x, generator), level)  # q(x_l | image)
        out = denoiser(torch.where(regenerate, x, known), level)
        # The sampler updates its own state x, not the network input: rewrite the known region of
        # the output relative to x, so that its update moves x's known region along a forward path
        # of the original (e.g. DDIM: x_next = sqrt(abar') image + sqrt(1 - abar') eps(x, image)).
        return adapter.with_known_x0(out, x, level, image.to(x.dtype), keep)

    return wrapped


# ---- resampling jumps (RePaint, Sec. 4.2) ---------------------------------------------------------


def check_jumps(jump_length: int, jump_n_sample: int, num_levels: int | None = None) -> bool:
    """Check RePaint's jump options; returns whether jumps are on (``jump_n_sample > 1``).

    ``num_levels``: the network-call levels of the grid, if known (then ``jump_length`` must be
    smaller: a jump from the last level back up ``jump_length`` levels must stay on the grid).

    Raises:
        ConfigError: a value that is not an integer >= 1; ``jump_length > 1`` with
            ``jump_n_sample = 1`` (it would do nothing); ``jump_length >= num_levels``.
    """
    for flag, value in (("--jump-length", jump_length), ("--jump-n-sample", jump_n_sample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} {value!r}: must be an integer >= 1 (1 = no jumps; RePaint uses 10)")
    if jump_n_sample == 1:
        if jump_length > 1:
            raise ConfigError(f"--jump-length {jump_length} does nothing with --jump-n-sample 1: "
                              "set --jump-n-sample > 1 too (RePaint uses 10 and 10)")
        return False
    if num_levels is not None and jump_length >= num_levels:
        raise ConfigError(f"--jump-length {jump_length} is not shorter than the {num_levels} sampling steps: "
                          f"use at most {num_levels - 1} or more steps")
    return True


def resample_schedule(num_levels: int, jump_length: int = 1, jump_n_sample: int = 1) -> list[int]:
    """RePaint's time schedule with jumps (Lugmayr et al. 2022, Sec. 4.2; the paper's code
    ``get_schedule_jump`` and diffusers' ``RePaintScheduler.set_timesteps``) as grid positions.

    Position ``p`` is the state at the ``p``-th level of the descending grid of ``num_levels``
    network-call levels: 0 is the noisiest (``x_T``), ``num_levels`` the data. The schedule starts
    at 0, ends at ``num_levels`` and moves by one position at a time: ``+1`` is a descent (one
    network call at the level it leaves), ``-1`` a jump back up (forward noise, no call). In
    RePaint's count ``t = num_levels - 1 - p``: each time the descent *arrives* at a ``t`` in
    ``0, j, 2j, ... < num_levels - j``, it goes back up ``j`` levels and descends again, at most
    ``r - 1`` times per such ``t``.

    ``resample_schedule(6, 2, 2) == [0, 1, 2, 3, 2, 1, 2, 3, 4, 5, 4, 3, 4, 5, 6]``.
    ``jump_n_sample = 1``: ``[0, 1, ..., num_levels]``. Raises ``ConfigError`` as ``check_jumps``.
    """
    check_jumps(jump_length, jump_n_sample, num_levels)
    n, j = num_levels, jump_length
    left = {t: jump_n_sample - 1 for t in range(0, n - j, j)}  # jumps left to make at each t
    t, positions = n - 1, [0]
    while t >= 0:
        t -= 1
        positions.append(n - 1 - t)
        if left.get(t, 0) > 0:
            left[t] -= 1
            for _ in range(j):
                t += 1
                positions.append(n - 1 - t)
    return positions


def resample_num_calls(num_levels: int, jump_length: int = 1, jump_n_sample: int = 1) -> int:
    """Network calls of ``resample_schedule``: ``n + (r - 1) j |{0, j, 2j, ... < n - j}|``
    (``n`` when ``jump_n_sample = 1``). Raises ``ConfigError`` as ``check_jumps``."""
    if not check_jumps(jump_length, jump_n_sample, num_levels):
        return num_levels
    return num_levels + (jump_n_sample - 1) * jump_length * len(range(0, num_levels - jump_length, jump_length))


Scales = tuple[Tensor, Tensor]  # (a, s), each (B,) float64: x_l = a x0 + s n


def ancestral_step(x: Tensor, x0: Tensor, level: Scales, lower: Scales, noise: Tensor) -> Tensor:
    """One draw of the Gaussian posterior ``q(x_l' | x_l = x, x0)`` from ``level`` down to ``lower``.

    ``x``, ``x0``, ``noise``: ``(B, ...)``; ``level``, ``lower``: ``(a, s)`` of ``x_l = a x0 + s n``
    with ``s_l > 0``, ``a_l' > 0`` (``lower = (1, 0)`` is the data: returns ``x0``). With
    ``a = a_l / a_l'`` and ``tau^2 = s_l^2 - a^2 s_l'^2`` (the variance the forward step
    ``l' -> l`` adds): mean ``(a s_l'^2 / s_l^2) x + (a_l' tau^2 / s_l^2) x0``, variance
    ``tau^2 s_l'^2 / s_l^2``; for gaussian levels this is Ho et al. 2020, eq. 7 on the respaced
    chain. With the true ``x0`` it maps a draw of ``q(x_l | x0)`` to one of ``q(x_l' | x0)``.
    """
    (a_l, s_l), (a_n, s_n) = level, lower
    ratio = a_l / a_n
    tau2 = (s_l**2 - ratio**2 * s_n**2).clamp_min(0)
    coef_x = _col(ratio * s_n**2 / s_l**2, x)
    coef_x0 = _col(a_n * tau2 / s_l**2, x)
    std = _col(tau2.sqrt() * s_n / s_l, x)
    return coef_x * x + coef_x0 * x0 + std * noise


def forward_jump(x: Tensor, lower: Scales, level: Scales, noise: Tensor) -> Tensor:
    """The forward transition ``q(x_l | x_l' = x)`` back up from ``lower`` to the noisier ``level``:
    ``(a_l / a_l') x + sqrt(s_l^2 - (a_l / a_l')^2 s_l'^2) noise`` (``(B, ...)``; ``a_l' > 0``)."""
    (a_n, s_n), (a_l, s_l) = lower, level
    ratio = a_l / a_n
    return _col(ratio, x) * x + _col((s_l**2 - ratio**2 * s_n**2).clamp_min(0).sqrt(), x) * noise


def _resample(
    wrapped: Callable[[Tensor, Tensor], Any],
    adapter: FamilyAdapter,
    x: Tensor,
    levels: Grid,
    jump_length: int,
    jump_n_sample: int,
    generator: GeneratorArg,
    callback: Callable[[int, Tensor, Tensor], None] | None,
) -> Tensor:
    """Walk ``resample_schedule`` over the grid ``levels`` from ``x`` ``(B, ...)`` (the state at
    ``levels[0]``) with ``ancestral_step`` down (one call of the inpainting ``wrapped``) and
    ``forward_jump`` up. ``callback(i, x, x0_hat)`` after each call; returns the data-level state."""
    n = len(levels) - int(adapter.grid_ends_at_data)
    schedule = resample_schedule(n, jump_length, jump_n_sample)
    batch, dtype = x.shape[0], torch.promote_types(x.dtype, torch.float32)
    ones = torch.ones(batch, dtype=torch.float64)
    calls: list[Tensor] = []  # the level tensor the denoiser gets at each position (as the samplers build it)
    scales: list[Scales] = []
    for value in levels[:n]:
        if adapter.family == "gaussian":
            level = torch.full((batch,), int(value), dtype=torch.long, device=x.device)
        else:
            level = torch.full((batch,), float(value), dtype=dtype, device=x.device)
        calls.append(level)
        scales.append(adapter.scales(level))
    scales.append((ones, torch.zeros_like(ones)))  # the data level
    step = 0
    for here, there in zip(schedule[:-1], schedule[1:]):
        if there > here:  # down: one network call
            out = wrapped(x, calls[here])
            x0 = adapter.x0_from_prediction(out, x, calls[here])
            noise = randn_like(x, generator) if there < n else torch.zeros_like(x)
            x = ancestral_step(x, x0, scales[here], scales[there], noise)
            if callback is not None:
                callback(step, x, x0)
            step += 1
        else:  # back up: forward noise, no call
            x = forward_jump(x, scales[here], scales[there], randn_like(x, generator))
    return x


def inpaint(
    sampler: Callable[..., Tensor],
    denoiser: Callable[[Tensor, Tensor], Any],
    x_T: Tensor,
    *grid: Any,
    image: Tensor,
    mask: Tensor,
    adapter: FamilyAdapter,
    generator: GeneratorArg = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    jump_length: int = 1,
    jump_n_sample: int = 1,
    **options: Any,
) -> Tensor:
    """Run any ``sampler`` of ``adapter.family`` with the inpainting wrapper, then paste the known region.

    ``grid`` is what the sampler takes after ``x_T`` (gaussian: ``alphas_cumprod, timesteps``;
    flow: ``ts``; edm: ``sigmas``); ``options`` go to the sampler (e.g. ``eta``). The sampler also
    gets ``generator`` if it is given (samplers that take none, e.g. ``euler``, get none).
    ``mask`` is checked with ``prepare_mask`` (a soft mask is thresholded at 0.5; call
    ``prepare_mask`` first to show its note). Returns ``(B, ...)`` with
    ``out == image`` exactly where ``mask == 0``.

    ``jump_length`` ``j`` and ``jump_n_sample`` ``r`` (RePaint's resampling, module docstring):
    ``r = 1`` (default) runs ``sampler``; ``r > 1`` walks ``resample_schedule`` over the grid's
    levels (``grid[-1]``) with ancestral steps instead, ``sampler`` and ``options`` unused, and
    ``callback`` called once per network call (``resample_num_calls`` of them, not ``n``).
    Raises ``ConfigError`` as ``prepare_mask`` and ``check_jumps``.
    """
    mask, _ = prepare_mask(mask, image)
    image = image.to(x_T.dtype)
    levels = grid[-1] if grid else ()
    num_levels = len(levels) - int(adapter.grid_ends_at_data)
    jumping = check_jumps(jump_length, jump_n_sample, num_levels)
    wrapped = inpaint_denoiser(denoiser, adapter, image, mask, generator=generator)
    if jumping:
        x = _resample(wrapped, adapter, x_T, levels, jump_length, jump_n_sample, generator, callback)
        return torch.where(mask.bool(), x, image)
    if generator is not None and _takes(sampler, "generator"):
        options["generator"] = generator
    x = sampler(wrapped, x_T, *grid, callback=callback, **options)
    return torch.where(mask.bool(), x, image)  # the final paste: known region exactly the original


def _takes(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` accepts keyword ``name`` (the family contract says every sampler takes
    ``generator``; deterministic ones written before it may not)."""
    while hasattr(fn, "__wrapped__"):  # see through decorators such as torch.no_grad
        fn = fn.__wrapped__
    code = getattr(fn, "__code__", None)
    if code is None or code.co_flags & 0x08:  # not plain Python, or it takes **kwargs
        return True
    return name in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


def _check_strength(strength: float) -> float:
    strength = float(strength)
    if not (0.0 < strength <= 1.0) or math.isnan(strength):
        raise ConfigError(f"--strength {strength} is outside (0, 1]: 1 is plain sampling, small keeps the input")
    return strength


def sdedit_start(
    image: Tensor, grid: Grid, strength: float, noise: Tensor, adapter: FamilyAdapter
) -> tuple[Grid, Tensor]:
    """SDEdit (Meng et al. 2022, Alg. 1): the grid cut to its last ``strength`` part and the start.

    Args:
        image: ``(B, ...)`` the user's image in the model's space.
        grid: the family's descending grid (gaussian timesteps; flow ``ts`` 1 -> 0; edm
            ``sigmas`` ending with 0), as a list or tensor.
        strength: in (0, 1]. ``k = floor(strength * n)`` of the ``n`` network-call levels are kept
            (as diffusers' img2img pipelines). ``strength = 1`` keeps the grid and returns
            ``prior_std * noise`` exactly: plain sampling from the same ``x_T`` for the same seed.
            ``k = 0`` (tiny strength) returns an empty grid and ``image`` itself.
        noise: ``(B, ...)`` standard normal draw (per-sample seeded, as the prior's).

    Returns:
        ``(grid_cut, x_start)``; ``grid_cut`` has the type of ``grid`` and is what the sampler
        takes; when it has no network-call level the caller returns ``x_start`` (the input).

    Raises:
        ConfigError: ``strength`` outside (0, 1]; ``noise`` and ``image`` of different shapes.
    """
    strength = _check_strength(strength)
    if noise.shape != image.shape:
        raise ConfigError(f"noise {tuple(noise.shape)} and image {tuple(image.shape)} differ in shape")
    n = len(grid) - 1 if adapter.grid_ends_at_data else len(grid)
    if strength == 1.0:
        return grid, adapter.prior_std(float(grid[0])) * noise.to(image.dtype)
    k = min(int(strength * n), n)
    if k == 0:
        return grid[len(grid):], image.clone()
    cut = grid[n - k:]
    level = torch.full((image.shape[0],), float(cut[0]), dtype=torch.float64)
    if adapter.family == "gaussian":
        level = level.long()
    return cut, adapter.add_noise(image, noise.to(image.dtype), level)
