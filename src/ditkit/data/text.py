"""Text corpora for the token models: reading, built-in corpora, packing, held-out split.

Pipeline (``build_text_dataset``): documents (and optional labels) -> tokenizer fit on the corpus ->
one token stream per label with the separator after every document -> a contiguous held-out
validation block at the end of each of ``num_val_blocks`` equal segments of the stream -> packing
into non-overlapping ``(N, seq_len)`` int64 chunks -> validation chunks that appear verbatim in the
training stream are counted and (by default) dropped, so a memorising model is not flattered.

Sources: a ``.txt`` file (one document), a folder of ``.txt`` files (one document each; subfolders
give labels, like image class folders), a ``.jsonl`` file (``text_field``, optional ``label_field``),
or a built-in corpus that needs no download:

* ``pydoc``: the documentation topics that ship with every CPython (``pydoc_data.topics``);
* ``synthetic-sums``: ``a+b=c`` with ``0 <= a, b <= 9`` (validity: ``is_valid_sum``);
* ``synthetic-brackets``: balanced strings over ``()[]`` (validity: ``is_balanced``);
* ``synthetic``: both, labelled ``sums`` / ``brackets`` (for label conditioning and guidance);
* ``python-styles``: three writing styles from the Python installation itself, labelled
  ``docstring`` (the standard library's module docstrings, doctest lines dropped), ``reference``
  (the language reference topics of ``pydoc_data``) and ``code`` (standard-library source with
  every docstring removed), each cut to the same number of characters (``python_style_documents``; the text
  depends on the Python version). ``write_style_corpus(folder)`` writes it as a labelled folder.

Files that are not UTF-8 are skipped with a warning naming them and their count (``strict=True``
refuses them instead).
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ditkit.config import BUILTIN_TEXT_CORPORA
from ditkit.data.tokenizers import Tokenizer, build_tokenizer

__all__ = [
    "TextDataset",
    "BUILTIN_TEXT_CORPORA",
    "read_documents",
    "synthetic_documents",
    "python_style_documents",
    "write_style_corpus",
    "STYLE_CORPUS",
    "is_valid_sum",
    "is_balanced",
    "SYNTHETIC_CHECKERS",
    "check_synthetic",
    "pack_stream",
    "verbatim_overlaps",
    "complete_segments",
    "build_text_dataset",
]



# ------------------------------------------------------------------------------------------------
# The synthetic language and its validity checkers
# ------------------------------------------------------------------------------------------------

_SUM = re.compile(r"(0|[1-9][0-9]*)\+(0|[1-9][0-9]*)=(0|[1-9][0-9]*)")
_PAIRS = {")": "(", "]": "["}


def is_valid_sum(text: str) -> bool:
    """``"a+b=c"`` with canonical decimal integers (no leading zeros) and ``a + b == c``."""
    m = _SUM.fullmatch(text)
    return m is not None and int(m.group(1)) + int(m.group(2)) == int(m.group(3))


def is_balanced(text: str) -> bool:
    """A non-empty string over ``()[]`` in which every bracket is closed by its own kind, in order."""
    if not text:
        return False
    stack: list[str] = []
    for ch in text:
        if ch in "([":
            stack.append(ch)
        elif ch in _PAIRS:
            if not stack or stack.pop() != _PAIRS[ch]:
                return False
        else:
            return False
    return not stack


SYNTHETIC_CHECKERS: dict[str, Callable[[str], bool]] = {"sums": is_valid_sum, "brackets": is_balanced}


def check_synthetic(text: str, label: str | None = None) -> bool:
    """Validity in the synthetic language: of the labelled kind, or of either kind when unlabelled."""
    if label is not None:
        return SYNTHETIC_CHECKERS[label](text)
    return any(check(text) for check in SYNTHETIC_CHECKERS.values())


def _random_brackets(rng: random.Random, max_pairs: int) -> str:
    """A uniformly random length (1..max_pairs pairs) balanced string; opens/closes by coin flips."""
    pairs = rng.randint(1, max_pairs)
    out, stack, opened = [], [], 0
    while opened < pairs or stack:
        if stack and (opened == pairs or rng.random() < 0.5):
            out.append(")" if stack.pop() == "(" else "]")
        else:
            ch = rng.choice("([")
            stack.append(ch)
            out.append(ch)
            opened += 1
    return "".join(out)


def synthetic_documents(
    kind: str = "synthetic", num_docs: int = 20000, seed: int = 0, max_operand: int = 9, max_pairs: int = 6
) -> tuple[list[str], list[str] | None]:
    """Documents of the synthetic language; labels (``"sums"``/``"brackets"``) only for the mixed kind."""
    rng = random.Random(seed)

    def a_sum() -> str:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        return f"{a}+{b}={a + b}"

    if kind == "synthetic-sums":
        return [a_sum() for _ in range(num_docs)], None
    if kind == "synthetic-brackets":
        return [_random_brackets(rng, max_pairs) for _ in range(num_docs)], None
    if kind == "synthetic":
        labels = [rng.choice(("sums", "brackets")) for _ in range(num_docs)]
        docs = [a_sum() if lab == "sums" else _random_brackets(rng, max_pairs) for lab in labels]
        return docs, labels
    raise ValueError(f"unknown synthetic corpus {kind!r}; choose one of {BUILTIN_TEXT_CORPORA[1:]}")


# ------------------------------------------------------------------------------------------------
# A built-in style corpus from text that ships with Python
# ------------------------------------------------------------------------------------------------

STYLE_CORPUS = "python-styles"


def python_style_documents(max_chars_per_style: int = 120_000) -> tuple[list[str], list[str]]:
    """Documents and labels of three styles, each about ``max_chars_per_style`` characters (whole
    documents, in sorted order, until the budget is spent): ``docstring`` (module docstrings of
    the standard library's top-level ``.py`` files), ``reference`` (``pydoc_data.topics``) and
    ``code`` (the same files' source with every docstring removed, as ``ast.unparse`` writes it)."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docstrings, code = [], []
    for path in sorted(stdlib.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        doc = ast.get_docstring(tree)
        if doc and len(doc) > 200:  # prose only: doctest examples would read as code
            prose = [line for line in doc.splitlines() if not line.lstrip().startswith((">>>", "..."))]
            docstrings.append("\n".join(prose).strip())
        for node in ast.walk(tree):  # code only: every docstring dropped
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
        try:
            text = ast.unparse(tree).strip()
        except (ValueError, RecursionError):
            continue
        if text:
            code.append(text[:4000])  # a module's opening: imports, classes, functions

    def budget(texts: list[str]) -> list[str]:
        out, total = [], 0
        for text in texts:
            if total >= max_chars_per_style:
                break
            out.append(text[: max_chars_per_style - total])
            total += len(out[-1])
        return out

    styles = {"docstring": budget(docstrings), "reference": budget([topics[k].strip() for k in sorted(topics)]),
              "code": budget(code)}
    docs = [d for texts in styles.values() for d in texts]
    labels = [name for name, texts in styles.items() for _ in texts]
    return docs, labels


def write_style_corpus(folder: str | Path, max_chars_per_style: int = 120_000) -> Path:
    """Write ``python_style_documents`` as ``folder/<style>/NNNN.txt`` (a labelled text folder for
    ``--data``); returns ``folder``."""
    folder = Path(folder)
    docs, labels = python_style_documents(max_chars_per_style)
    counts: dict[str, int] = {}
    for doc, label in zip(docs, labels):
        (folder / label).mkdir(parents=True, exist_ok=True)
        counts[label] = counts.get(label, 0) + 1
        (folder / label / f"{counts[label]:04d}.txt").write_text(doc, encoding="utf-8")
    return folder


# ------------------------------------------------------------------------------------------------
# Reading documents
# ------------------------------------------------------------------------------------------------


def _read_utf8(files: Sequence[Path], strict: bool) -> tuple[list[str], list[bool]]:
    """Texts of ``files`` and which were read; non-UTF-8 files are skipped with one warning that
    names them and says how many (``strict``: ``ValueError`` naming the first)."""
    texts, ok, bad = [], [], []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
            ok.append(True)
        except UnicodeDecodeError as err:
            if strict:
                raise ValueError(f"{f} is not UTF-8 text ({err.reason} at byte {err.start}): convert it or drop it") from None
            bad.append(str(f))
            ok.append(False)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        warnings.warn(f"skipped {len(bad)} file(s) that are not UTF-8 text: {shown}", stacklevel=3)
    return texts, ok


def read_documents(
    source: str | Path,
    text_field: str = "text",
    label_field: str | None = None,
    synthetic_docs: int = 20000,
    seed: int = 0,
    strict: bool = False,
) -> tuple[list[str], list[str] | None]:
    """Documents and (optional) string labels from a built-in name, a .txt file, a folder or a .jsonl.
    Non-UTF-8 files in a folder are skipped with a warning (``strict``: refused, ``ValueError``);
    a folder with no readable text, a JSONL line without the text field or with empty text raise
    ``ValueError`` / ``KeyError`` naming the file and line."""
    name = str(source)
    if name == STYLE_CORPUS:
        return python_style_documents()
    if name == "pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)], None
    if name.startswith("synthetic"):
        return synthetic_documents(name, num_docs=synthetic_docs, seed=seed)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"text source {name!r} not found: give a .txt/.jsonl file, a folder of .txt files, "
            f"or a built-in corpus ({', '.join(BUILTIN_TEXT_CORPORA)})"
        )
    if path.is_dir():
        subdirs = sorted(d for d in path.iterdir() if d.is_dir() and any(d.glob("*.txt")))
        if subdirs:  # one subfolder per label
            files = [f for d in subdirs for f in sorted(d.glob("*.txt"))]
            texts, ok = _read_utf8(files, strict)
            labels = [f.parent.name for f, good in zip(files, ok) if good]
            if not texts:
                raise ValueError(f"folder {path} holds no UTF-8 .txt files")
            return texts, labels
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"folder {path} holds no .txt files (one per document, or one subfolder of them per label)")
        texts, _ = _read_utf8(files, strict)
        if not texts:
            raise ValueError(f"folder {path} holds no UTF-8 .txt files")
        return texts, None
    if path.suffix == ".jsonl":
        docs, labels = [], []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if text_field not in row:
                raise KeyError(f"{path}:{lineno} has no field {text_field!r}; set text_field to the text's key")
            if not str(row[text_field]).strip():
                raise ValueError(f"{path}:{lineno} has an empty {text_field!r}: drop the line or give it text")
            docs.append(str(row[text_field]))
            if label_field is not None:
                if label_field not in row:
                    raise KeyError(f"{path}:{lineno} has no label field {label_field!r}")
                labels.append(str(row[label_field]))
        return docs, (labels if label_field is not None else None)
    return [path.read_text(encoding="utf-8")], None


# ------------------------------------------------------------------------------------------------
# Packing, splitting, overlap check
# ------------------------------------------------------------------------------------------------


def pack_stream(stream: Tensor, seq_len: int) -> Tensor:
    """Cut a 1-D token stream into non-overlapping ``(N, seq_len)`` chunks (the remainder is dropped)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len).clone()


def _split_blocks(stream: Tensor, val_fraction: float, num_blocks: int) -> tuple[list[Tensor], list[Tensor]]:
    """Cut the stream into ``num_blocks`` equal segments; the trailing ``val_fraction`` of each one is
    held out. Returns the contiguous training and validation pieces."""
    train, val = [], []
    bounds = torch.linspace(0, stream.numel(), num_blocks + 1).long().tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        cut = hi - int(round((hi - lo) * val_fraction))
        train.append(stream[lo:cut])
        val.append(stream[cut:hi])
    return train, val


def verbatim_overlaps(chunks: Tensor, streams: Sequence[Tensor]) -> Tensor:
    """``(M,)`` bool: does each row of ``chunks`` ``(M, L)`` occur verbatim (token for token) in any of
    the 1-D ``streams``? Byte search over int32 tokens, keeping only token-aligned matches."""
    haystacks = [s.to(torch.int32).numpy().tobytes() for s in streams]
    out = torch.zeros(chunks.shape[0], dtype=torch.bool)
    for i, row in enumerate(chunks.to(torch.int32)):
        needle = row.numpy().tobytes()
        for hay in haystacks:
            pos = hay.find(needle)
            while pos != -1 and pos % 4:
                pos = hay.find(needle, pos + 1)
            if pos != -1:
                out[i] = True
                break
    return out


def complete_segments(ids: Sequence[int], sep_id: int) -> list[list[int]]:
    """The documents of a packed sample that are complete: the pieces between two separators
    (the first and last pieces may be cut by the window edge and are dropped)."""
    pieces: list[list[int]] = [[]]
    for i in ids:
        if int(i) == sep_id:
            pieces.append([])
        else:
            pieces[-1].append(int(i))
    return pieces[1:-1]


@dataclass
class TextDataset:
    """Packed token chunks. ``train`` ``(N, L)`` / ``val`` ``(M, L)`` int64; labels ``(N,)`` / ``(M,)``
    int64 or ``None``; ``val_chars`` ``(M,)`` characters each validation chunk decodes to (the
    separator counts as one), for bits per character."""

    train: Tensor
    val: Tensor
    train_labels: Tensor | None
    val_labels: Tensor | None
    val_chars: Tensor
    tokenizer: Tokenizer
    class_names: list[str] | None
    num_val_overlaps: int  # validation chunks found verbatim in the training stream
    num_val_dropped: int

    @property
    def num_classes(self) -> int:
        return 0 if self.class_names is None else len(self.class_names)

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def build_text_dataset(
    source: str | Path,
    seq_len: int,
    tokenizer: str | Tokenizer = "char",
    *,
    bpe_vocab_size: int = 1024,
    val_fraction: float = 0.1,
    num_val_blocks: int = 1,
    text_field: str = "text",
    label_field: str | None = None,
    drop_val_overlaps: bool = True,
    synthetic_docs: int = 20000,
    seed: int = 0,
    strict: bool = False,
) -> TextDataset:
    """Read, tokenize, split and pack a corpus (see the module docstring).

    ``tokenizer`` is ``"char"``, ``"bpe"`` (byte-level BPE trained on this corpus, ``bpe_vocab_size``
    tokens), a path to a ``tokenizer.json`` / saved tokenizer, or a tokenizer object. The tokenizer
    is fit on the whole corpus (validation text included), as usual for character vocabularies.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    docs, labels = read_documents(source, text_field, label_field, synthetic_docs=synthetic_docs, seed=seed, strict=strict)
    tok = build_tokenizer(str(tokenizer), docs, bpe_vocab_size) if isinstance(tokenizer, (str, Path)) else tokenizer

    class_names = sorted(set(labels)) if labels is not None else None
    groups: dict[int, list[int]] = {}
    for i, doc in enumerate(docs):
        label = class_names.index(labels[i]) if class_names is not None and labels is not None else -1
        groups.setdefault(label, []).extend(tok.encode(doc) + [tok.sep_id])

    train_chunks, val_chunks, train_labels, val_labels, train_streams = [], [], [], [], []
    for label, ids in groups.items():
        stream = torch.tensor(ids, dtype=torch.long)
        train_pieces, val_pieces = _split_blocks(stream, val_fraction, num_val_blocks)
        train_streams.extend(train_pieces)
        for piece, chunks, chunk_labels in ((train_pieces, train_chunks, train_labels), (val_pieces, val_chunks, val_labels)):
            for p in piece:
                packed = pack_stream(p, seq_len)
                chunks.append(packed)
                chunk_labels.append(torch.full((packed.shape[0],), label, dtype=torch.long))
    train, val = torch.cat(train_chunks), torch.cat(val_chunks)
    if train.shape[0] == 0 or val.shape[0] == 0:
        raise ValueError(
            f"corpus too small for seq_len={seq_len}: {train.shape[0]} training and {val.shape[0]} validation "
            "chunks; use a shorter seq_len, a larger val_fraction or more text"
        )
    overlap = verbatim_overlaps(val, train_streams)
    keep = ~overlap if drop_val_overlaps else torch.ones_like(overlap)
    val = val[keep]
    val_lab = torch.cat(val_labels)[keep]
    if val.shape[0] == 0:
        raise ValueError("every validation chunk appears verbatim in the training text; the corpus is too repetitive")
    val_chars = torch.tensor([len(tok.decode(row.tolist())) for row in val], dtype=torch.long)
    return TextDataset(
        train=train,
        val=val,
        train_labels=torch.cat(train_labels) if class_names is not None else None,
        val_labels=val_lab if class_names is not None else None,
        val_chars=val_chars,
        tokenizer=tok,
        class_names=class_names,
        num_val_overlaps=int(overlap.sum()),
        num_val_dropped=int((~keep).sum()),
    )
