"""Evaluate a text checkpoint (``ditkit eval`` on a text model): likelihood, validity, diversity, speed.
The image twin is ``ditkit.eval.model_eval``; both sample through the pipelines.

``evaluate_text(ckpt)`` returns a JSON-ready dict:

* ``likelihood``: on the held-out chunks of the checkpoint's corpus (rebuilt with its saved
  tokenizer), bits per character (the chunks' decoded characters, ``TextDataset.val_chars``) and per
  token. Masked diffusion: the NELBO upper bound (MDLM eqs. 10-11) with its Monte-Carlo standard
  error over ``num_passes`` independent stratified passes; autoregressive: the exact value.
* ``samples``: ``num_samples`` unprompted samples of ``seq_len`` tokens -- the fraction of valid
  complete documents for the synthetic corpora, distinct-n for n = 1..4 (and the same on the
  validation chunks, for reference), and sampling throughput in generated tokens per second.
* ``style`` (label-conditional models): a ``StyleClassifier`` fit on the labelled training chunks,
  its accuracy on the held-out chunks (how far the judge can be trusted), and the style accuracy
  of the samples: the share it assigns to the label each was drawn for (``style_judge``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ditkit.builders import build_objective
from ditkit.config import Config, ConfigError
from ditkit.data.text import SYNTHETIC_CHECKERS, check_synthetic
from ditkit.data.text_loader import TextTrainingSet, load_text_data, tokenizer_kind
from ditkit.device import autocast
from ditkit.eval.text import (
    StyleClassifier,
    distinct_ngrams,
    fraction_valid,
    sampling_throughput,
    style_accuracy,
    text_likelihood,
)

__all__ = ["evaluate_text", "synthetic_checker", "TextPeriodicEvaluator", "style_judge"]


def style_judge(data: TextTrainingSet, max_chunks: int = 4000) -> tuple[StyleClassifier, float]:
    """A ``StyleClassifier`` fit on (at most ``max_chunks`` evenly spaced) decoded training chunks
    of a labelled corpus, and its accuracy on the held-out chunks. ``ConfigError`` without labels."""
    if not data.num_classes or data.labels is None or data.val_labels is None:
        raise ConfigError("style accuracy needs a labelled corpus (label folders or data.label_field)")
    tok = data.tokenizer
    step = max(1, len(data) // max_chunks)
    texts = [tok.decode(row.tolist()) for row in data.tokens[::step]]
    clf = StyleClassifier(max(data.num_classes, 2)).fit(texts, data.labels[::step].tolist())
    val = [tok.decode(row.tolist()) for row in data.text.val]
    return clf, clf.accuracy(val, data.val_labels.tolist())


def synthetic_checker(cfg: Config, class_names: list[str]) -> Optional[Callable[[str, Optional[int]], bool]]:
    """``check(text, label) -> valid`` for the built-in synthetic corpora, None for other text."""
    name = cfg.data.dataset
    if name == "synthetic-sums":
        return lambda text, label: SYNTHETIC_CHECKERS["sums"](text)
    if name == "synthetic-brackets":
        return lambda text, label: SYNTHETIC_CHECKERS["brackets"](text)
    if name == "synthetic":
        def check(text: str, label: Optional[int]) -> bool:
            kind = class_names[label] if label is not None and label < len(class_names) else None
            return check_synthetic(text, kind if kind in SYNTHETIC_CHECKERS else None)

        return check
    return None


def evaluate_text(
    ckpt: str | Path,
    *,
    num_samples: int = 64,
    num_sampling_steps: Optional[int] = None,
    cfg_scale: Optional[float] = None,
    temperature: Optional[float] = None,
    seed: Optional[int] = None,
    num_passes: int = 4,
    max_val_sequences: Optional[int] = None,
    batch_size: int = 64,
    use_ema: bool = True,
    device: str = "auto",
    precision: str = "auto",
) -> dict[str, Any]:
    """Score a text checkpoint (see the module docstring). ``max_val_sequences`` caps the held-out
    chunks (the first ones); sample ``i`` uses seed ``seed + i``; conditional models cycle labels."""
    if num_samples < 1 or num_passes < 1 or batch_size < 1:
        raise ConfigError("--num-samples, --num-passes and --batch-size must be at least 1")
    from ditkit.pipelines.text import TextPipeline

    pipe = TextPipeline.from_checkpoint(ckpt, device=device, precision=precision, use_ema=use_ema)
    model, cfg, tokenizer, dev, dtype = pipe.model, pipe.cfg, pipe.tokenizer, pipe.device, pipe.dtype
    data = load_text_data(cfg.data, tokenizer)
    val, chars, val_labels = data.text.val, data.text.val_chars, data.val_labels
    if max_val_sequences is not None:
        val, chars = val[:max_val_sequences], chars[:max_val_sequences]
        val_labels = val_labels[:max_val_sequences] if val_labels is not None else None
    objective = pipe.objective
    seed = cfg.sample.seed if seed is None else seed

    t0 = time.perf_counter()
    with autocast(dev, dtype):
        likelihood = text_likelihood(
            objective, model, val.to(dev), None if val_labels is None else val_labels.to(dev), num_chars=chars,
            num_passes=num_passes, batch_size=batch_size, generator=torch.Generator().manual_seed(seed),
        )
    likelihood_s = time.perf_counter() - t0

    num_classes = cfg.data.num_classes or 0
    labels = [i % num_classes for i in range(num_samples)] if num_classes else None
    drawn: dict[str, torch.Tensor] = {}

    def draw() -> torch.Tensor:
        out = pipe(num_samples=num_samples, class_labels=labels, num_inference_steps=num_sampling_steps,
                   guidance_scale=cfg_scale, temperature=temperature, seed=seed, batch_size=batch_size,
                   at_document_start=False, allow_untrained_uncond=True)
        drawn["tokens"] = out.tokens
        return drawn["tokens"]

    speed = sampling_throughput(draw)
    tokens = drawn["tokens"]
    s = cfg.sample
    samples: dict[str, Any] = {
        "num_samples": num_samples,
        "num_tokens": tokens.shape[1],
        "sampler": pipe.sampler_name,
        # autoregressive: one network call per generated token
        "num_sampling_steps": tokens.shape[1] if cfg.objective.kind == "autoregressive" else (
            s.num_sampling_steps if num_sampling_steps is None else num_sampling_steps),
        "cfg_scale": s.cfg_scale if cfg_scale is None else cfg_scale,
        "temperature": s.temperature if temperature is None else temperature,
        "seed": seed,
        "tokens_per_s": speed["tokens_per_s"],
        "seconds": speed["seconds"],
    }
    checker = synthetic_checker(cfg, data.class_names)
    if checker is not None:
        per_label = [
            fraction_valid(tokens[i : i + 1], tokenizer, lambda text, i=i: checker(text, labels[i] if labels else None))
            for i in range(num_samples)
        ]
        num_docs = sum(r["num_documents"] for r in per_label)
        samples["fraction_valid"] = (
            sum(r["fraction_valid"] * r["num_documents"] for r in per_label) / num_docs if num_docs else 0.0
        )
        samples["num_documents"] = int(num_docs)
    if labels is not None and num_classes >= 2 and data.labels is not None:
        judge, judge_val = style_judge(data)
        texts = [tokenizer.decode(row.tolist()) for row in tokens]
        style = style_accuracy(judge, texts, labels)
        samples["style"] = {**style, "judge_validation_accuracy": judge_val}
    for n in (1, 2, 3, 4):
        samples[f"distinct_{n}"] = distinct_ngrams(tokens, n)
        samples[f"distinct_{n}_validation"] = distinct_ngrams(val[: max(num_samples, 1)], n)
    samples["examples"] = [tokenizer.decode(row.tolist()) for row in tokens[:4]]

    bound = "exact" if likelihood.exact else "NELBO upper bound"
    meta = pipe.provenance()
    return {
        "software": meta["software"],
        "checkpoint": meta["checkpoint"],
        "checkpoint_sha256": meta["checkpoint_sha256"],
        "step": pipe.step,
        "weights": pipe.weights,
        "model": cfg.model.name,
        "objective": cfg.objective.kind,
        "dataset": cfg.data.dataset,
        "tokenizer": tokenizer_kind(tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "seq_len": cfg.data.seq_len,
        "likelihood": {"kind": bound, **likelihood.to_dict(), "seconds": likelihood_s},
        "validation": {
            "num_sequences": int(val.shape[0]),
            "num_overlapping_chunks_dropped": data.text.num_val_dropped,
        },
        "samples": samples,
        "precision": str(dtype).removeprefix("torch."),
    }


class TextPeriodicEvaluator:
    """Evaluation during training of a text run (``train.eval_every``): the likelihood of the first
    ``train.eval_samples`` held-out chunks under the EMA model. Returns ``{val_bits_per_char,
    val_bits_per_char_stderr, val_bits_per_token, eval_sequences, eval_seconds}``: the NELBO bound
    for masked diffusion (``num_passes`` passes, the same stratified times at every evaluation, so
    successive values differ by the model only), the exact value for AR. Never touches the
    training RNGs. Same constructor as the image ``PeriodicEvaluator`` (``vae`` is unused)."""

    def __init__(
        self,
        cfg: Config,
        dataset: TextTrainingSet,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vae: Any = None,
        log: Callable[[str], None] = print,
        num_passes: int = 2,
    ):
        n = cfg.train.eval_samples
        self.device, self.dtype, self.num_passes = torch.device(device), dtype, num_passes
        self.objective = build_objective(cfg)
        self.tokens = dataset.text.val[:n].to(self.device)
        self.num_chars = dataset.text.val_chars[:n]
        labels = dataset.val_labels
        self.labels = labels[:n].to(self.device) if labels is not None else None
        self.seed = cfg.sample.seed
        log(f"eval every {cfg.train.eval_every} steps: bits per char on {self.tokens.shape[0]} validation chunks")

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            with autocast(self.device, self.dtype):
                lik = text_likelihood(
                    self.objective, model, self.tokens, self.labels, num_chars=self.num_chars,
                    num_passes=self.num_passes, generator=torch.Generator().manual_seed(self.seed),
                )
        return {
            "val_bits_per_char": lik.bits_per_char,
            "val_bits_per_char_stderr": lik.stderr_bits_per_char,
            "val_bits_per_token": lik.bits_per_token,
            "eval_sequences": lik.num_sequences,
            "eval_seconds": time.perf_counter() - t0,
        }
