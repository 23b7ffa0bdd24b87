"""Tokenizers for text models: character-level and byte-level BPE, saved as one JSON file.

Every tokenizer numbers its real tokens ``0 .. vocab_size - 1``; one of them is the separator
(``sep_id``) written between documents when they are packed. The mask token of masked diffusion
(and the BOS token of the autoregressive baseline) is the extra id ``mask_id = vocab_size``: it is
never produced by ``encode`` and the text model embeds ``vocab_size + 1`` ids.

A tokenizer is saved beside a checkpoint as ``text_tokenizer.json`` (``save_tokenizer``) and
rebuilt by ``load_tokenizer``, which also accepts a plain Hugging Face ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from ditkit.fileio import write_bytes

__all__ = [
    "Tokenizer",
    "CharTokenizer",
    "BPETokenizer",
    "build_tokenizer",
    "save_tokenizer",
    "tokenizer_json",
    "load_tokenizer",
    "TOKENIZER_FILE",
]

TOKENIZER_FILE = "text_tokenizer.json"
SEP_TOKEN = "<|sep|>"


class Tokenizer(Protocol):
    """What the data, eval and sampling code need from a tokenizer."""

    vocab_size: int  # real tokens, separator included; the mask id is vocab_size

    @property
    def sep_id(self) -> int: ...

    @property
    def mask_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_dict(self) -> dict: ...


class CharTokenizer:
    """One id per character of the corpus (sorted), then the separator, then (implicitly) the mask.

    ``decode`` renders the separator as ``sep_text`` (a newline by default) and the mask id as
    ``mask_text`` so partially sampled sequences can be printed.
    """

    def __init__(self, chars: Iterable[str], sep_text: str = "\n", mask_text: str = "_"):
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer takes single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.sep_text, self.mask_text = sep_text, mask_text
        self.vocab_size = len(self.chars) + 1  # + separator

    @classmethod
    def fit(cls, texts: Iterable[str], **kwargs: str) -> CharTokenizer:
        """Vocabulary = every character that occurs in ``texts``."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise ValueError("cannot build a character vocabulary from an empty corpus")
        return cls(chars, **kwargs)

    @property
    def sep_id(self) -> int:
        return len(self.chars)

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in the vocabulary of this CharTokenizer "
                "(build the tokenizer on a corpus that contains it)"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < len(self.chars):
                out.append(self.chars[i])
            elif i == self.sep_id:
                out.append(self.sep_text)
            elif i == self.mask_id:
                out.append(self.mask_text)
            else:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {self.vocab_size} (+ mask)")
        return "".join(out)

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": "".join(self.chars), "sep_text": self.sep_text, "mask_text": self.mask_text}


class BPETokenizer:
    """Byte-level BPE from the Hugging Face ``tokenizers`` library (GPT-2 style byte alphabet).

    ``fit`` trains merges on a corpus; ``from_file`` wraps an existing ``tokenizer.json`` (its
    separator is ``sep_token`` if present, else the first special token, else one is added).
    """

    def __init__(self, hf_tokenizer: object, sep_token: str = SEP_TOKEN, mask_text: str = "_"):
        if hf_tokenizer.token_to_id(sep_token) is None:  # type: ignore[attr-defined]
            hf_tokenizer.add_special_tokens([sep_token])  # type: ignore[attr-defined]
        self.hf = hf_tokenizer
        self.sep_token, self.mask_text = sep_token, mask_text
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))  # type: ignore[attr-defined]
        self._sep_id = int(hf_tokenizer.token_to_id(sep_token))  # type: ignore[attr-defined]

    @classmethod
    def fit(cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> BPETokenizer:
        """Train byte-level BPE merges on ``texts`` up to ``vocab_size`` tokens (separator included)."""
        tk = _import_tokenizers()
        hf = tk.Tokenizer(tk.models.BPE())
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[SEP_TOKEN],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """Wrap a Hugging Face ``tokenizer.json`` found on disk (nothing is downloaded)."""
        tk = _import_tokenizers()
        hf = tk.Tokenizer.from_file(str(path))
        specials = [t.content for t in hf.get_added_tokens_decoder().values() if t.special]
        sep = SEP_TOKEN if hf.token_to_id(SEP_TOKEN) is not None or not specials else specials[0]
        return cls(hf, sep_token=sep)

    @property
    def sep_id(self) -> int:
        return self._sep_id

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False).ids)  # type: ignore[attr-defined]

    def decode(self, ids: Sequence[int]) -> str:
        # Decode runs between separators/masks so those render visibly and consistently.
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in (self.sep_id, self.mask_id):
                out.append(self.hf.decode(run, skip_special_tokens=False) if run else "")  # type: ignore[attr-defined]
                out.append("\n" if i == self.sep_id else self.mask_text)
                run = []
            elif 0 <= i < self.vocab_size:
                run.append(i)
            else:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {self.vocab_size} (+ mask)")
        if run:
            out.append(self.hf.decode(run, skip_special_tokens=False))  # type: ignore[attr-defined]
        return "".join(out)

    def to_dict(self) -> dict:
        return {
            "kind": "bpe",
            "tokenizer": json.loads(self.hf.to_str()),  # type: ignore[attr-defined]
            "sep_token": self.sep_token,
            "mask_text": self.mask_text,
        }


def _import_tokenizers():  # noqa: ANN202
    try:
        import tokenizers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "byte-level BPE needs the `tokenizers` package: pip install tokenizers "
            "(or use the character-level tokenizer: tokenizer='char')"
        ) from err
    return tokenizers


def build_tokenizer(kind: str, texts: Sequence[str], bpe_vocab_size: int = 1024) -> Tokenizer:
    """``kind``: ``"char"``, ``"bpe"`` (trained on ``texts``), or a path to a ``tokenizer.json`` /
    a saved ``text_tokenizer.json`` / a directory holding one."""
    if kind == "char":
        return CharTokenizer.fit(texts)
    if kind == "bpe":
        return BPETokenizer.fit(texts, vocab_size=bpe_vocab_size)
    if Path(kind).exists():
        return load_tokenizer(kind)
    raise ValueError(f"tokenizer={kind!r}: choose 'char', 'bpe' or a path to a tokenizer.json")


def tokenizer_json(tokenizer: Any) -> bytes:
    """What ``text_tokenizer.json`` holds: ``tokenizer.to_dict()`` as UTF-8 JSON (text and caption tokenizers)."""
    return json.dumps(tokenizer.to_dict(), ensure_ascii=False).encode("utf-8")


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write ``directory/text_tokenizer.json`` atomically (a temp file, then a rename: a crash
    never leaves a half-written tokenizer beside a checkpoint); returns its path."""
    path = write_bytes(Path(directory) / TOKENIZER_FILE, tokenizer_json(tokenizer))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Rebuild a tokenizer from a checkpoint directory, a ``text_tokenizer.json``, or a Hugging Face
    ``tokenizer.json`` (byte-level BPE or any other model the library reads)."""
    path = Path(path)
    if path.is_dir():
        if not (path / TOKENIZER_FILE).exists():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {path}: was this checkpoint trained on text?")
        path = path / TOKENIZER_FILE
    spec = json.loads(path.read_text())
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"], sep_text=spec["sep_text"], mask_text=spec["mask_text"])
    if kind == "bpe":
        tk = _import_tokenizers()
        hf = tk.Tokenizer.from_str(json.dumps(spec["tokenizer"]))
        return BPETokenizer(hf, sep_token=spec["sep_token"], mask_text=spec["mask_text"])
    if "model" in spec:  # a plain Hugging Face tokenizer.json
        return BPETokenizer.from_file(path)
    raise ValueError(f"{path} is neither a ditkit {TOKENIZER_FILE} nor a Hugging Face tokenizer.json")
