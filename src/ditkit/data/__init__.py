"""Training data: image folders, array files and built-in datasets, in memory as uint8 tensors.

``load_dataset(cfg.data)`` returns an ``ImageDataset`` resized to ``image_size`` with the requested
channels and number of classes; ``EpochBatchSampler`` turns it into seeded, resumable batches in
[-1, 1]. Text: ``load_text_data(cfg.data)`` packs a corpus into int64 token chunks with a held-out
split and a tokenizer (``ditkit.data.text``, ``ditkit.data.tokenizers``); ``TextBatchSampler``
batches them the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ditkit.config import DataConfig
from ditkit.data.builtin import SHAPE_CLASSES, load_digits, load_mnist_subset, make_shapes
from ditkit.data.images import (
    DataError,
    ImageDataset,
    center_crop_resize,
    convert_channels,
    load_array_file,
    load_image_folder,
)
from ditkit.data.sampler import EpochBatchSampler, to_model_range
from ditkit.data.text import BUILTIN_TEXT_CORPORA, TextDataset, build_text_dataset
from ditkit.data.text_loader import TextBatchSampler, TextTrainingSet, load_text_data
from ditkit.data.tokenizers import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer, save_tokenizer

__all__ = [
    "DataError",
    "ImageDataset",
    "EpochBatchSampler",
    "load_dataset",
    "is_caption_data",
    "to_model_range",
    "load_digits",
    "load_mnist_subset",
    "make_shapes",
    "SHAPE_CLASSES",
    "load_image_folder",
    "load_array_file",
    "BUILTIN_TEXT_CORPORA",
    "TextDataset",
    "build_text_dataset",
    "TextTrainingSet",
    "TextBatchSampler",
    "load_text_data",
    "Tokenizer",
    "CharTokenizer",
    "BPETokenizer",
    "save_tokenizer",
    "load_tokenizer",
]


def is_caption_data(cfg: DataConfig) -> bool:
    """Whether ``cfg`` is a prompt model's data (captions): ``shapes_captions`` or ``data.captioned``."""
    return cfg.dataset == "shapes_captions" or bool(getattr(cfg, "captioned", False))


def load_dataset(cfg: DataConfig, caption_tokenizer: Any = None) -> ImageDataset:
    """Load ``cfg.dataset`` (built-in name, image folder or array file) as configured;
    ``caption_tokenizer``: a resumed prompt run's own (else fitted or chosen from the config).

    Returns images ``(N, C, image_size, image_size)`` uint8. ``cfg.num_classes`` 0 drops the
    labels (unconditional); a positive value must cover every label in the data.
    """
    name = cfg.dataset
    if is_caption_data(cfg):  # prompt models: (image, caption ids) pairs
        from ditkit.data.captions import load_caption_training_set

        return load_caption_training_set(cfg, caption_tokenizer)  # type: ignore[return-value]
    from ditkit.data.audio import is_audio_source, load_audio_dataset  # librosa only when audio is asked for

    if is_audio_source(name):  # log-mels (N, n_mels, T) uint8 for the audio DiT (ditkit.data.audio)
        return load_audio_dataset(cfg)
    from ditkit.data.video import is_video_source, load_video_dataset

    if is_video_source(cfg):  # clips (N, C, F, H, W) uint8 for Latte (ditkit.data.video)
        return load_video_dataset(cfg)  # type: ignore[return-value]
    if name == "digits":
        ds = load_digits()
    elif name == "mnist":
        ds = load_mnist_subset()
    elif name == "shapes":
        ds = make_shapes(cfg.num_items, cfg.image_size)
    else:
        path = Path(name)
        if path.is_dir():
            ds = load_image_folder(path, cfg.image_size, cfg.channels)
        elif path.suffix in (".npz", ".npy"):
            ds = load_array_file(path, cfg.image_size, cfg.channels)
        elif path.exists():
            raise DataError(f"--data {name}: expected a folder of images or a .npz/.npy file")
        else:
            raise DataError(f"--data {name}: no such file or folder, and not a built-in dataset (digits, shapes, mnist)")

    images, labels = ds.images, ds.labels
    if cfg.max_items is not None:
        images = images[: cfg.max_items]
        labels = labels[: cfg.max_items] if labels is not None else None
    if cfg.channels is not None:
        images = convert_channels(images, cfg.channels)
    images = center_crop_resize(images, cfg.image_size)

    num_classes, class_names = ds.num_classes, ds.class_names
    if cfg.num_classes == 0:
        labels, num_classes, class_names = None, 0, []
    elif cfg.num_classes is not None:
        if labels is None:
            raise DataError(
                f"--num-classes {cfg.num_classes} but {ds.source} has no labels: use a folder with one "
                "subfolder per class, an .npz with 'labels', or --num-classes 0"
            )
        if cfg.num_classes < ds.num_classes:
            raise DataError(
                f"--num-classes {cfg.num_classes} is smaller than the {ds.num_classes} classes in "
                f"{ds.source}: use --num-classes {ds.num_classes} (or 0 for unconditional)"
            )
        num_classes = cfg.num_classes
        class_names = class_names + [str(i) for i in range(len(class_names), num_classes)]
    return ImageDataset(images.contiguous(), labels, num_classes, class_names, ds.source)
