"""Autoregressive next-token objective on the same token backbone (the baseline for masked diffusion).

The network is a ``TextDiT`` built with ``causal=True``; it is called as ``model(inp, t, y)`` with
``t = 0`` (a causal model is built without time conditioning, so ``t`` is ignored). The input is the
sequence shifted right behind a BOS token, for which the mask id ``V`` is reused, so the model scores
all ``L`` tokens of a chunk -- the same ``L`` tokens the masked-diffusion bound covers:

    -log p(x) = sum_{l=0}^{L-1} -log p_theta(x^l | BOS, x^{<l})      (nats, exact)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ditkit.diffusion.objective import Objective
from ditkit.errors import ConfigError
from ditkit.registry import OBJECTIVES

__all__ = ["AutoregressiveLM"]


@OBJECTIVES.register("autoregressive", modality="text", family="autoregressive")
class AutoregressiveLM(Objective):
    """Next-token cross-entropy with a BOS token; ``loss`` has the interface of every objective.

    Args:
        vocab_size: real tokens ``V``; BOS is id ``V`` (the mask id of the masked objective).
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.bos_id = vocab_size, vocab_size

    family = "autoregressive"
    default_sampler = "autoregressive"  # what sample.sampler "auto" means

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "AutoregressiveLM":
        """From a full config: ``data.vocab_size`` (set by training from the tokenizer). Raises
        ``ConfigError`` when it is not known yet. ``overrides`` (e.g. the image objectives'
        ``clip_x0``) do not apply to tokens and are ignored."""
        if cfg.data.vocab_size is None:
            raise ConfigError("data.vocab_size must be known to build a text objective (set by training)")
        return cls(cfg.data.vocab_size)

    def global_draws(self, x: Tensor, global_batch: int, rows: slice, generator: torch.Generator) -> dict[str, Tensor]:
        """Nothing: the next-token likelihood is exact, so no random input is shared out."""
        return {}

    def shift_right(self, x0: Tensor) -> Tensor:
        """``(B, L)`` -> ``(B, L)``: ``[BOS, x_0, ..., x_{L-2}]``."""
        bos = torch.full_like(x0[:, :1], self.bos_id)
        return torch.cat([bos, x0[:, :-1]], dim=1)

    def loss_terms(
        self,
        model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
        x0: Tensor,
        y: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-sequence terms ``(B,)``: ``nll`` (exact, nats, summed over the L positions),
        ``num_tokens`` (``L``), ``loss`` (``nll / num_tokens``). ``generator`` is unused (no noise)."""
        if x0.dtype != torch.long or x0.ndim != 2:
            raise ValueError(f"the AR objective expects int64 token ids (B, L), got {tuple(x0.shape)} {x0.dtype}")
        if getattr(model, "causal", True) is False:
            raise ValueError("the autoregressive objective needs a causal model: build the TextDiT with causal=True")
        t = torch.zeros(x0.shape[0], device=x0.device)
        logits = model(self.shift_right(x0), t, y)  # (B, L, V)
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"model returned {logits.shape[-1]} classes for a vocabulary of {self.vocab_size}")
        nll = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none").sum(1)
        num_tokens = torch.full_like(nll, x0.shape[1])
        return {"nll": nll, "num_tokens": num_tokens, "loss": nll / num_tokens}

    def denoiser(self, net: Callable[[Tensor, Tensor], Tensor], context_len: int) -> Callable[[Tensor], Tensor]:
        """Adapt ``net(x, t) -> logits (B, n, V)`` (conditioning bound) to the AR sampler:
        ``fn(tokens (B, n) int64, n >= 0) -> (B, V)`` float32 log-probabilities of the next token,
        seeing BOS and at most the last ``context_len - 1`` tokens (the training window)."""
        if context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {context_len}")

        def fn(tokens: Tensor) -> Tensor:
            tokens = tokens[:, max(0, tokens.shape[1] - (context_len - 1)) :]
            bos = torch.full((tokens.shape[0], 1), self.bos_id, dtype=torch.long, device=tokens.device)
            inp = torch.cat([bos, tokens], 1)
            t = torch.zeros(tokens.shape[0], device=tokens.device)
            return F.log_softmax(net(inp, t)[:, -1].float(), dim=-1)

        return fn
