"""Text evaluation: likelihood in bits per character/token, sample validity, diversity, throughput.

* ``masked_diffusion_bound``: the MDLM NELBO, an upper bound on ``-log p(x)``, on held-out chunks;
  ``num_passes`` independent passes over the set (each sequence one stratified time per pass), so
  the Monte-Carlo standard error is the spread of the pass estimates over ``sqrt(num_passes)``.
* ``autoregressive_nll``: the AR model's exact negative log-likelihood of the same chunks.
* ``fraction_valid`` (synthetic language), ``distinct_ngrams``, ``sampling_throughput``.

Bits per character divide the total by the characters the chunks decode to (``TextDataset.val_chars``),
so character and BPE models are compared on one scale.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ditkit.data.text import complete_segments
from ditkit.data.tokenizers import Tokenizer
from ditkit.diffusion.autoregressive import AutoregressiveLM
from ditkit.diffusion.masked import MaskedDiffusion, stratified_times

__all__ = [
    "TextLikelihood",
    "masked_diffusion_bound",
    "autoregressive_nll",
    "text_likelihood",
    "fraction_valid",
    "distinct_ngrams",
    "sampling_throughput",
]

LN2 = math.log(2.0)


@dataclass
class TextLikelihood:
    """Likelihood on a token set. For masked diffusion an upper bound (NELBO) with its Monte-Carlo
    standard error over times/masks; for AR exact (standard error 0)."""

    bits_per_char: float
    bits_per_token: float
    stderr_bits_per_char: float
    stderr_bits_per_token: float
    num_sequences: int
    num_tokens: int
    num_chars: int
    num_passes: int
    exact: bool

    def to_dict(self) -> dict:
        return asdict(self)


class _EvalMode:
    """Put an nn.Module in eval mode (no label dropout) for the block; restore afterwards."""

    def __init__(self, model: object):
        self.model, self.was_training = model, getattr(model, "training", None)

    def __enter__(self) -> None:
        if self.was_training is not None:
            self.model.eval()  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        if self.was_training:
            self.model.train()  # type: ignore[attr-defined]


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _finish(pass_nats: Sequence[float], num_seq: int, num_tok: int, num_chars: int, exact: bool) -> TextLikelihood:
    totals = torch.tensor(pass_nats, dtype=torch.float64)
    mean = float(totals.mean())
    stderr = float(totals.std(unbiased=True) / math.sqrt(len(totals))) if len(totals) > 1 else (0.0 if exact else math.nan)
    return TextLikelihood(
        bits_per_char=mean / LN2 / num_chars,
        bits_per_token=mean / LN2 / num_tok,
        stderr_bits_per_char=stderr / LN2 / num_chars,
        stderr_bits_per_token=stderr / LN2 / num_tok,
        num_sequences=num_seq,
        num_tokens=num_tok,
        num_chars=num_chars,
        num_passes=len(totals),
        exact=exact,
    )


def _count_chars(tokens: Tensor, num_chars: int | Tensor | None) -> int:
    if num_chars is None:  # character-level: one character per token
        return tokens.numel()
    return int(num_chars.sum()) if isinstance(num_chars, Tensor) else int(num_chars)


@torch.no_grad()
def masked_diffusion_bound(
    objective: MaskedDiffusion,
    model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    tokens: Tensor,
    labels: Tensor | None = None,
    *,
    num_chars: int | Tensor | None = None,
    num_passes: int = 4,
    batch_size: int = 64,
    estimator: str = "time",
    include_prior: bool = True,
    generator: torch.Generator | None = None,
) -> TextLikelihood:
    """NELBO of ``tokens`` ``(N, L)`` under a masked-diffusion model, in bits per character and token.

    Each of ``num_passes`` passes draws one time per sequence, stratified over the whole set (so each
    sequence's time is ``U(0, 1]`` and the set covers (0, 1] evenly), and sums the per-sequence
    estimates. ``estimator="time"`` is the ``1/t`` form (MDLM eqs. 10-11), ``"count"`` the
    number-of-masks form (``MaskedDiffusion.count_form_nll``). ``include_prior`` adds
    ``eps * log V`` per token. ``num_chars``: characters the set decodes to (default: one per token).
    """
    if num_passes < 1:
        raise ValueError(f"num_passes must be >= 1, got {num_passes}")
    if estimator not in ("time", "count"):
        raise ValueError(f"estimator={estimator!r}: choose 'time' or 'count'")
    N, L = tokens.shape
    device = tokens.device
    prior = N * L * objective.prior_nats_per_token() if include_prior else 0.0
    pass_nats = []
    with _EvalMode(model):
        for _ in range(num_passes):
            u = stratified_times(N, generator=generator, device=device)  # (N,) in (0, 1]
            total = prior
            for sl in _batches(N, batch_size):
                y = None if labels is None else labels[sl]
                if estimator == "time":
                    terms = objective.loss_terms(model, tokens[sl], y, generator, t=u[sl])
                    total += float(terms["nll"].double().sum())
                else:
                    k = torch.ceil(u[sl] * L).long().clamp(1, L)
                    total += float(objective.count_form_nll(model, tokens[sl], y, generator, num_masked=k).double().sum())
            pass_nats.append(total)
    return _finish(pass_nats, N, N * L, _count_chars(tokens, num_chars), exact=False)


@torch.no_grad()
def autoregressive_nll(
    objective: AutoregressiveLM,
    model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    tokens: Tensor,
    labels: Tensor | None = None,
    *,
    num_chars: int | Tensor | None = None,
    batch_size: int = 64,
) -> TextLikelihood:
    """Exact negative log-likelihood of ``tokens`` ``(N, L)`` under the AR model (BOS + L tokens)."""
    N, L = tokens.shape
    total = 0.0
    with _EvalMode(model):
        for sl in _batches(N, batch_size):
            y = None if labels is None else labels[sl]
            total += float(objective.loss_terms(model, tokens[sl], y)["nll"].double().sum())
    return _finish([total], N, N * L, _count_chars(tokens, num_chars), exact=True)


def text_likelihood(
    objective: MaskedDiffusion | AutoregressiveLM,
    model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    tokens: Tensor,
    labels: Tensor | None = None,
    **kwargs: object,
) -> TextLikelihood:
    """Dispatch to ``masked_diffusion_bound`` or ``autoregressive_nll`` by objective type."""
    if isinstance(objective, MaskedDiffusion):
        return masked_diffusion_bound(objective, model, tokens, labels, **kwargs)  # type: ignore[arg-type]
    if isinstance(objective, AutoregressiveLM):
        kwargs = {k: v for k, v in kwargs.items() if k in ("num_chars", "batch_size")}
        return autoregressive_nll(objective, model, tokens, labels, **kwargs)  # type: ignore[arg-type]
    raise TypeError(f"no text likelihood for objective {type(objective).__name__}")


def fraction_valid(
    samples: Tensor | Sequence[Sequence[int]],
    tokenizer: Tokenizer,
    checker: Callable[[str], bool],
) -> dict[str, float]:
    """Share of complete documents (between two separators) in packed samples that ``checker``
    accepts; also the number checked and the mean number per sample."""
    rows = samples.tolist() if isinstance(samples, Tensor) else samples
    segments = [seg for row in rows for seg in complete_segments(row, tokenizer.sep_id)]
    valid = sum(checker(tokenizer.decode(seg)) for seg in segments)
    return {
        "fraction_valid": valid / len(segments) if segments else 0.0,
        "num_documents": float(len(segments)),
        "documents_per_sample": len(segments) / max(len(rows), 1),
    }


def distinct_ngrams(samples: Tensor | Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams over all n-grams, pooled over the samples."""
    rows = samples.tolist() if isinstance(samples, Tensor) else samples
    grams = [tuple(row[i : i + n]) for row in rows for i in range(len(row) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sampling_throughput(sample_fn: Callable[[], Tensor], num_generated: int | None = None) -> dict[str, float]:
    """Time one call of ``sample_fn`` (which returns ``(B, L)`` tokens): generated tokens per second.
    ``num_generated`` defaults to every token of the output."""
    start = time.perf_counter()
    out = sample_fn()
    seconds = time.perf_counter() - start
    n = out.numel() if num_generated is None else num_generated
    return {"tokens_per_s": n / seconds, "seconds": seconds, "num_tokens": float(n)}
