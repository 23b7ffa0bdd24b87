"""Text corpora for the one training loop: a config's data section to packed token chunks, and
seeded, resumable batches of them.

``load_text_data(cfg.data)`` reads, tokenizes, splits and packs the corpus with
``ditkit.data.text.build_text_dataset`` and wraps the result as a ``TextTrainingSet``, which the loop
treats like an ``ImageDataset`` (``len``, ``labels``, ``num_classes``, ``source``). ``TextBatchSampler``
is the image ``EpochBatchSampler`` -- the same order as a pure function of ``(seed, epoch)``, the same
resumable ``(epoch, position)`` state -- handing out int64 token ids as they are (no float cast).

The corpus itself never depends on the training seed (the synthetic corpora use seed 0), so runs
with different seeds, and ``ditkit eval`` later, see the same training and validation text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ditkit.config import DataConfig
from ditkit.data.images import DataError
from ditkit.data.sampler import EpochBatchSampler
from ditkit.data.text import TextDataset, build_text_dataset
from ditkit.data.tokenizers import CharTokenizer, Tokenizer

__all__ = ["TextTrainingSet", "TextBatchSampler", "load_text_data", "tokenizer_kind"]


def tokenizer_kind(tokenizer: Tokenizer) -> str:
    """``"char"`` or ``"bpe"`` (for log lines and metadata)."""
    return "char" if isinstance(tokenizer, CharTokenizer) else "bpe"


@dataclass
class TextTrainingSet:
    """Packed training chunks as the loop sees them, plus everything else about the corpus.

    ``tokens``: ``(N, seq_len)`` int64 training chunks; ``labels``: ``(N,)`` int64 or None;
    ``text``: the full ``TextDataset`` (validation chunks, their character counts, tokenizer);
    ``num_classes``: after ``data.num_classes`` (0 drops the labels).
    """

    tokens: Tensor
    labels: Optional[Tensor]
    num_classes: int
    class_names: list[str]
    source: str
    text: TextDataset

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def images(self) -> Tensor:
        """The training chunks under the name ``EpochBatchSampler`` reads."""
        return self.tokens

    @property
    def tokenizer(self) -> Tokenizer:
        return self.text.tokenizer

    @property
    def val_labels(self) -> Optional[Tensor]:
        """Validation labels consistent with ``num_classes`` (None when trained unconditionally)."""
        return self.text.val_labels if self.num_classes else None

    def describe(self) -> str:
        """One line for the training log."""
        tok = self.tokenizer
        classes = f"{self.num_classes} classes" if self.num_classes else "no classes"
        return (
            f"{self.source} ({len(self)} training / {self.text.val.shape[0]} validation chunks of "
            f"{self.text.seq_len} tokens, {tokenizer_kind(tok)} vocabulary {tok.vocab_size} + mask, {classes})"
        )


class TextBatchSampler(EpochBatchSampler):
    """Yields ``(tokens (B, seq_len) int64, labels (B,) int64 or None)`` forever; state as the image
    sampler (``state_dict`` / ``load_state_dict``), so resume is exact."""

    def __init__(
        self, dataset: TextTrainingSet, batch_size: int, seed: int = 0, hflip: bool = False,
        device: torch.device | str = "cpu",
    ):
        if hflip:
            raise DataError("data.hflip flips images: set data.hflip=false for text")
        if batch_size > len(dataset):
            raise DataError(
                f"batch size {batch_size} is larger than the {len(dataset)} training chunks of {dataset.source}: "
                "lower --global-batch-size or data.seq_len, or use more text"
            )
        super().__init__(dataset, batch_size, seed=seed, hflip=False, device=device)  # type: ignore[arg-type]

    def next_batch(self) -> tuple[Tensor, Optional[Tensor]]:
        """The next batch; advances the position (and the epoch at its end)."""
        self._plan()
        lo = self.position * self.batch_size
        idx = self._perm[lo : lo + self.batch_size]
        y = self.labels[idx] if self.labels is not None else None
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return self.images[idx], y


def load_text_data(cfg: DataConfig, tokenizer: Optional[Tokenizer] = None) -> TextTrainingSet:
    """Build the corpus of ``cfg`` (``dataset``, ``seq_len``, ``tokenizer``, ...; see ``DataConfig``).

    ``tokenizer`` (a checkpoint's, on resume and in eval) replaces fitting one on the corpus. Labels
    follow ``cfg.num_classes`` as for images: None keeps the data's, 0 drops them, a count must cover
    them. Raises ``DataError`` with the fix.
    """
    try:
        ds = build_text_dataset(
            cfg.dataset, cfg.seq_len, tokenizer if tokenizer is not None else cfg.tokenizer,
            bpe_vocab_size=cfg.bpe_vocab_size, val_fraction=cfg.val_fraction, num_val_blocks=cfg.num_val_blocks,
            text_field=cfg.text_field, label_field=cfg.label_field, synthetic_docs=cfg.synthetic_docs,
            strict=bool(getattr(cfg, "strict", False)),  # data.strict: refuse non-UTF-8 files (when the config has it)
        )
    except (ValueError, KeyError, FileNotFoundError, ImportError) as err:
        raise DataError(f"--data {cfg.dataset}: {err.args[0] if err.args else err}") from None
    vocab = ds.tokenizer.vocab_size
    if cfg.vocab_size is not None and cfg.vocab_size != vocab:
        raise DataError(
            f"the tokenizer has {vocab} tokens but data.vocab_size={cfg.vocab_size}: the corpus or tokenizer "
            "changed since this config was saved; train a new run (or pass the saved tokenizer)"
        )
    tokens, labels = ds.train, ds.train_labels
    class_names = list(ds.class_names or [])
    if cfg.max_items is not None:
        tokens = tokens[: cfg.max_items]
        labels = labels[: cfg.max_items] if labels is not None else None
    num_classes = ds.num_classes
    if cfg.num_classes == 0:
        labels, num_classes, class_names = None, 0, []
    elif cfg.num_classes is not None:
        if labels is None:
            raise DataError(
                f"--num-classes {cfg.num_classes} but {cfg.dataset} has no labels: use a .jsonl with "
                "data.label_field, a folder with one subfolder per label, or --num-classes 0"
            )
        if cfg.num_classes < ds.num_classes:
            raise DataError(f"--num-classes {cfg.num_classes} is smaller than the {ds.num_classes} labels in {cfg.dataset}")
        num_classes = cfg.num_classes
        class_names += [str(i) for i in range(len(class_names), num_classes)]
    return TextTrainingSet(tokens.contiguous(), labels, num_classes, class_names, str(cfg.dataset), ds)
