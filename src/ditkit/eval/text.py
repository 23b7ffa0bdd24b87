"""Text evaluation: likelihood in bits per character/token, sample validity, diversity, throughput.

* ``masked_diffusion_bound``: the MDLM NELBO, an upper bound on ``-log p(x)``, on held-out chunks;
  ``num_passes`` independent passes over the set (each sequence one stratified time per pass), so
  the Monte-Carlo standard error is the spread of the pass estimates over ``sqrt(num_passes)``.
* ``block_diffusion_bound``: the BD3-LM NELBO (a sum of per-block MDLM bounds), by default in
  the number-of-masks form per block (finite variance; exact for block size 1), or with one
  unclipped time ``t ~ U(0, 1]`` per block; stratified over the set, ``num_passes`` passes.
* ``autoregressive_nll``: the AR model's exact negative log-likelihood of the same chunks.
* ``fraction_valid`` (synthetic language), ``distinct_ngrams``, ``sampling_throughput``.
* ``StyleClassifier``: a local judge of style / topic (multinomial naive Bayes over hashed
  character 1- to 4-grams, fit on the labelled training text in a second), and ``style_accuracy``:
  the share of samples it assigns to the label they were drawn for.

Bits per character divide the total by the characters the chunks decode to (``TextDataset.val_chars``),
so character and BPE models are compared on one scale.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ditkit.data.text import complete_segments
from ditkit.data.tokenizers import Tokenizer
from ditkit.diffusion.autoregressive import AutoregressiveLM
from ditkit.diffusion.block import BlockDiffusion
from ditkit.diffusion.masked import MaskedDiffusion, stratified_times

__all__ = [
    "TextLikelihood",
    "masked_diffusion_bound",
    "block_diffusion_bound",
    "autoregressive_nll",
    "text_likelihood",
    "fraction_valid",
    "distinct_ngrams",
    "sampling_throughput",
    "StyleClassifier",
    "style_accuracy",
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
def block_diffusion_bound(
    objective: BlockDiffusion,
    model: Callable[..., Tensor],
    tokens: Tensor,
    labels: Tensor | None = None,
    *,
    num_chars: int | Tensor | None = None,
    num_passes: int = 4,
    batch_size: int = 64,
    estimator: str = "count",
    include_prior: bool = True,
    generator: torch.Generator | None = None,
) -> TextLikelihood:
    """BD3-LM NELBO of ``tokens`` ``(N, L)`` in bits per character and token, each of ``num_passes``
    passes stratified over all ``N * L / block_size`` blocks of the set. ``estimator="count"``
    (default): the number-of-masks form (``BlockDiffusion.count_form_nll``; finite variance, exact
    for ``block_size = 1``); ``"time"``: one time per block from ``U(0, 1]`` (not the clipped
    training range, so it is a bound) and the ``1/t`` weight, whose variance grows without bound
    as blocks shrink. ``include_prior`` adds ``eps * log V`` per token."""
    if num_passes < 1:
        raise ValueError(f"num_passes must be >= 1, got {num_passes}")
    if estimator not in ("time", "count"):
        raise ValueError(f"estimator={estimator!r}: choose 'count' or 'time'")
    N, L = tokens.shape
    nb, k = objective.num_blocks(L), objective.block_size
    prior = N * L * objective.prior_nats_per_token() if include_prior else 0.0
    exact = estimator == "count" and k == 1
    pass_nats = []
    with _EvalMode(model):
        for _ in range(1 if exact else num_passes):
            u = objective.sample_times(N, L, generator, tokens.device, clipped=False)  # (N, L / block_size)
            total = prior
            for sl in _batches(N, batch_size):
                y = None if labels is None else labels[sl]
                if estimator == "time":
                    nll = objective.loss_terms(model, tokens[sl], y, generator, t=u[sl])["nll"]
                else:
                    n = torch.ceil(u[sl] * k).long().clamp(1, k)
                    nll = objective.count_form_nll(model, tokens[sl], y, generator, num_masked=n)
                total += float(nll.double().sum())
            pass_nats.append(total)
    return _finish(pass_nats, N, N * L, _count_chars(tokens, num_chars), exact=exact)


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
    objective: MaskedDiffusion | BlockDiffusion | AutoregressiveLM,
    model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    tokens: Tensor,
    labels: Tensor | None = None,
    **kwargs: object,
) -> TextLikelihood:
    """Dispatch to ``masked_diffusion_bound``, ``block_diffusion_bound`` or ``autoregressive_nll`` by objective type."""
    if isinstance(objective, BlockDiffusion):
        return block_diffusion_bound(objective, model, tokens, labels, **kwargs)  # type: ignore[arg-type]
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


class StyleClassifier:
    """Multinomial naive Bayes over hashed character n-grams (``n = 1..max_n``), a strong baseline
    for telling styles and topics apart (e.g. Cavnar & Trenkle 1994; Wang & Manning 2012).

    ``fit(texts, labels)`` counts n-grams per class (Laplace smoothing ``alpha``); ``predict``
    returns the most probable class per text; ``accuracy`` the share predicted right. Every text
    is scored per character, so short and long samples weigh the same. Deterministic, CPU, no
    training loop.
    """

    def __init__(self, num_classes: int, max_n: int = 4, num_buckets: int = 1 << 18, alpha: float = 0.1) -> None:
        if num_classes < 2:
            raise ValueError(f"a style classifier needs at least 2 classes, got {num_classes}")
        self.num_classes, self.max_n, self.num_buckets, self.alpha = num_classes, max_n, num_buckets, alpha
        self.log_probs: Tensor | None = None  # (C, buckets)
        self.log_prior: Tensor | None = None  # (C,)

    def _features(self, text: str) -> Tensor:
        """``(buckets,)`` float64 n-gram counts of ``text`` (a stable hash: CRC32 of the UTF-8 n-gram)."""
        import zlib

        counts = torch.zeros(self.num_buckets, dtype=torch.float64)
        ids = [zlib.crc32(text[i : i + n].encode("utf-8")) % self.num_buckets
               for n in range(1, self.max_n + 1) for i in range(len(text) - n + 1)]
        if ids:
            counts.index_add_(0, torch.tensor(ids), torch.ones(len(ids), dtype=torch.float64))
        return counts

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> "StyleClassifier":
        if len(texts) != len(labels) or not texts:
            raise ValueError(f"need as many labels as texts (got {len(texts)} texts, {len(labels)} labels)")
        counts = torch.zeros(self.num_classes, self.num_buckets, dtype=torch.float64)
        docs = torch.zeros(self.num_classes, dtype=torch.float64)
        for text, label in zip(texts, labels):
            counts[int(label)] += self._features(text)
            docs[int(label)] += 1
        if bool((docs == 0).any()):
            raise ValueError(f"classes without training text: {(docs == 0).nonzero().flatten().tolist()}")
        counts += self.alpha
        self.log_probs = counts.log() - counts.sum(1, keepdim=True).log()
        self.log_prior = (docs / docs.sum()).log()
        return self

    def scores(self, texts: Sequence[str]) -> Tensor:
        """``(N, C)`` log-posterior scores per character (unnormalised)."""
        if self.log_probs is None or self.log_prior is None:
            raise RuntimeError("fit the classifier first")
        feats = torch.stack([self._features(t) for t in texts])  # (N, buckets)
        lengths = torch.tensor([max(len(t), 1) for t in texts], dtype=torch.float64)
        return (feats @ self.log_probs.T) / lengths[:, None] + self.log_prior / lengths[:, None]

    def predict(self, texts: Sequence[str]) -> list[int]:
        return self.scores(texts).argmax(1).tolist()

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        predicted = self.predict(texts)
        return sum(int(p == int(y)) for p, y in zip(predicted, labels)) / max(len(labels), 1)


def style_accuracy(classifier: StyleClassifier, texts: Sequence[str], labels: Sequence[int]) -> dict[str, Any]:
    """Share of ``texts`` the classifier assigns to the label each was drawn for, overall and per label."""
    predicted = classifier.predict(texts)
    per: dict[int, list[int]] = {}
    for p, y in zip(predicted, labels):
        per.setdefault(int(y), []).append(int(p == int(y)))
    return {
        "style_accuracy": sum(sum(v) for v in per.values()) / max(len(predicted), 1),
        "per_label": {label: sum(v) / len(v) for label, v in sorted(per.items())},
        "num_samples": len(predicted),
    }
