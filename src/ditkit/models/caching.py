"""Step caching: reuse the transformer's work between neighbouring sampling steps, training-free.

A sampler calls the network once per step (or a few times) on an input that changed little since
the previous call. A step cache sits where a DiT runs its block stack (``model.step_cache``; the
models call it in place of ``run_blocks`` when set) and decides per network call whether to run the
blocks or to reuse what an earlier call computed. It wraps the network, not a sampler, so every
sampler of every family (and classifier-free guidance, the masked text sampler, ...) uses it
unchanged: the samplers only ever see a denoiser.

Two published rules, each with one knob:

* ``FORACache(interval)`` -- FORA (Selvaraju et al. 2024, arXiv 2407.01425, "Fast-Forward
  Caching"): every ``interval``-th call runs the blocks and stores each block's attention and MLP
  outputs; the calls between reuse them. The cheap parts still run with the current input: patch
  and timestep embeddings, every block's adaLN gates (a (B, D) Linear), the residual additions and
  the final layer. ``interval = 1`` never reuses.
* ``TeaCache(threshold)`` -- TeaCache (Liu et al. 2024, arXiv 2411.19108, "Timestep Embedding Tells:
  It's Time to Cache"): each call measures the relative L1 change of the first block's
  timestep-modulated input, ``mean|m_k - m_{k-1}| / mean|m_{k-1}|`` (sec. 3.3), accumulates it, and
  while the sum stays below ``threshold`` reuses the residual of the whole block stack (output minus
  input) stored at the last computed call; reaching it runs the blocks and resets the sum. The first
  call always computes. ``threshold = 0`` never reuses. The paper also rescales the change by a
  polynomial fitted per model (eq. 5); we use the raw change, so our thresholds are not the
  paper's numbers -- sweep them (benchmarks/fast_sampling.py).

A cache's decision is per call, for the whole batch: under classifier-free guidance the conditional
and unconditional halves travel in one batch of 2B and are reused together. Call ``reset()``
before each new trajectory (the pipelines do, per batch); a change of batch shape also forces a
computed call. ``calls`` / ``reused`` count network calls since the cache was built.

``make_step_cache("fora:3")`` / ``("teacache:0.1")`` / ``("none")`` builds one from a spec string.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ditkit.errors import ConfigError
from ditkit.models.layers import DiTBlock, modulate, run_blocks

__all__ = ["StepCache", "FORACache", "TeaCache", "make_step_cache", "STEP_CACHE_KINDS", "attach_step_cache"]

STEP_CACHE_KINDS = ("fora", "teacache")


class StepCache:
    """Base class: ``cache(blocks, x (B, N, D), c (B, D), **block_kwargs) -> (B, N, D)`` replaces the
    model's block loop. Subclasses implement ``_run``; ``spec`` names the rule and its knob."""

    spec: str = ""

    def __init__(self) -> None:
        self.calls = 0  # network calls seen (all trajectories)
        self.reused = 0  # of which reused cached work instead of running the blocks
        self.reset()

    def reset(self) -> None:
        """Forget the cached state (a new trajectory starts); the counters keep running."""

    def __call__(self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self._run(blocks, x, c, **block_kwargs)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def summary(self) -> str:
        """``"reused 30 of 50 network calls"``: for output metadata."""
        return f"reused {self.reused} of {self.calls} network calls"


class FORACache(StepCache):
    """FORA: recompute the blocks' attention and MLP outputs every ``interval`` calls, reuse them
    (under the current adaLN gates) in between. Raises ``ConfigError`` for ``interval < 1``."""

    def __init__(self, interval: int) -> None:
        if int(interval) != interval or interval < 1:
            raise ConfigError(f"cache fora:{interval}: the interval must be a whole number >= 1 (1 = never reuse)")
        self.interval = int(interval)
        self.spec = f"fora:{self.interval}"
        super().__init__()

    def reset(self) -> None:
        self._step = 0  # calls since the trajectory began
        self._features: list[tuple[torch.Tensor, torch.Tensor]] = []  # per block: (attn (B, N, D), mlp (B, N, D))
        self._shape: Optional[torch.Size] = None

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        fresh = self._step % self.interval == 0 or self._shape != x.shape or len(self._features) != len(blocks)
        self._step += 1
        if fresh:
            return self._compute(blocks, x, c, **block_kwargs)
        self.reused += 1
        for block, (attn, mlp) in zip(blocks, self._features):
            # Only the gates are recomputed: adaLN is a (B, D) -> (B, 6D) Linear, no token work.
            _, _, gate_msa, _, _, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * attn
            x = x + gate_mlp.unsqueeze(1) * mlp
        return x

    def _compute(self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        """Run the blocks unchanged (bitwise the uncached path) and record each block's attention and
        MLP outputs through forward hooks."""
        _check_blocks(blocks)
        attn_out: list[torch.Tensor] = []
        mlp_out: list[torch.Tensor] = []
        if self.interval > 1:  # interval 1 never reads the features: skip recording them
            handles = [b.attn.register_forward_hook(lambda m, i, o: attn_out.append(o)) for b in blocks]
            handles += [b.mlp.register_forward_hook(lambda m, i, o: mlp_out.append(o)) for b in blocks]
        else:
            handles = []
        try:
            out = run_blocks(blocks, x, c, False, **block_kwargs)
        finally:
            for h in handles:
                h.remove()
        self._features = list(zip(attn_out, mlp_out))
        self._shape = x.shape
        return out


class TeaCache(StepCache):
    """TeaCache: reuse the block stack's residual while the accumulated relative L1 change of the
    first block's modulated input stays below ``threshold`` (see the module docstring).
    Raises ``ConfigError`` for a negative threshold."""

    def __init__(self, threshold: float) -> None:
        if not threshold >= 0:
            raise ConfigError(f"cache teacache:{threshold}: the threshold must be >= 0 (0 = never reuse)")
        self.threshold = float(threshold)
        self.spec = f"teacache:{self.threshold:g}"
        super().__init__()

    def reset(self) -> None:
        self._previous: Optional[torch.Tensor] = None  # last call's modulated input (B, N, D) float32
        self._residual: Optional[torch.Tensor] = None  # blocks(x) - x at the last computed call
        self._accumulated = 0.0

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        _check_blocks(blocks)
        first = blocks[0]
        shift_msa, scale_msa = first.adaLN_modulation(c).chunk(6, dim=1)[:2]
        modulated = modulate(first.norm1(x), shift_msa, scale_msa).float()  # (B, N, D)
        reuse = False
        if self._previous is not None and self._residual is not None and self._previous.shape == modulated.shape:
            change = (modulated - self._previous).abs().mean() / self._previous.abs().mean().clamp_min(1e-12)
            self._accumulated += float(change)
            reuse = self._accumulated < self.threshold
        self._previous = modulated
        if reuse:
            self.reused += 1
            return x + self._residual
        self._accumulated = 0.0
        out = run_blocks(blocks, x, c, False, **block_kwargs)
        self._residual = out - x
        return out


def _check_blocks(blocks: nn.ModuleList) -> None:
    if not len(blocks) or not all(isinstance(b, DiTBlock) for b in blocks):
        raise ConfigError("step caching needs a stack of DiT blocks (DiT, TextDiT); this model has other blocks: drop the cache")


def make_step_cache(spec: Optional[str]) -> Optional[StepCache]:
    """``"fora:N"`` -> ``FORACache(N)``, ``"teacache:T"`` -> ``TeaCache(T)``; None, ``""``, ``"none"``
    or ``"off"`` -> None. Raises ``ConfigError`` naming the accepted forms otherwise."""
    if spec is None or str(spec).strip().lower() in ("", "none", "off"):
        return None
    kind, _, knob = str(spec).strip().lower().partition(":")
    usage = "use fora:N (recompute every N calls) or teacache:T (relative-change threshold T), e.g. fora:3 or teacache:0.1"
    try:
        if kind == "fora":
            return FORACache(int(knob) if knob else 2)
        if kind == "teacache":
            return TeaCache(float(knob) if knob else 0.1)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"--cache {spec}: {knob!r} is not a number; {usage}") from None
    raise ConfigError(f"--cache {spec}: unknown cache {kind!r}; {usage}")


class attach_step_cache:
    """``with attach_step_cache(model, cache):`` -- the model's forward uses ``cache`` (reset first)
    inside the block and its own block loop again after. ``cache=None`` does nothing. Raises
    ``ConfigError`` for a model without the ``step_cache`` hook."""

    def __init__(self, model: nn.Module, cache: Optional[StepCache]) -> None:
        if cache is not None and not hasattr(model, "step_cache"):
            raise ConfigError(f"{type(model).__name__} has no step-cache hook (DiT and TextDiT have): drop --cache")
        self.model, self.cache = model, cache

    def __enter__(self) -> Optional[StepCache]:
        if self.cache is not None:
            self.cache.reset()
            self.model.step_cache = self.cache
        return self.cache

    def __exit__(self, *exc: Any) -> None:
        if self.cache is not None:
            self.model.step_cache = None
