"""Text data: tokenizers (round trips, save/load), reading, packing, held-out split, overlap check,
the synthetic language's checkers."""

import json

import pytest
import torch

from ditkit.data.text import (
    build_text_dataset,
    check_synthetic,
    complete_segments,
    is_balanced,
    is_valid_sum,
    pack_stream,
    read_documents,
    synthetic_documents,
    verbatim_overlaps,
)
from ditkit.data.tokenizers import CharTokenizer, load_tokenizer, save_tokenizer

TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n"


def test_char_tokenizer_round_trip_and_special_ids(tmp_path):
    tok = CharTokenizer.fit([TEXT])
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) == len(TEXT)
    assert tok.sep_id == len(set(TEXT)) and tok.vocab_size == tok.sep_id + 1 and tok.mask_id == tok.vocab_size
    assert max(ids) < tok.sep_id  # text never encodes to the separator or the mask
    assert tok.decode([tok.sep_id, tok.mask_id]) == "\n_"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("Z")
    again = load_tokenizer(save_tokenizer(tok, tmp_path))
    assert again.encode(TEXT) == ids and again.vocab_size == tok.vocab_size


def test_bpe_tokenizer_round_trip_save_load_and_local_file(tmp_path):
    pytest.importorskip("tokenizers")
    from ditkit.data.tokenizers import BPETokenizer

    corpus = [TEXT * 20, "naïve café, ünïcode — ok"]
    tok = BPETokenizer.fit(corpus, vocab_size=300)
    text = "that is the question: naïve café"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned
    assert tok.sep_id not in ids and max(ids) < tok.vocab_size
    assert tok.decode(ids + [tok.sep_id] + ids) == text + "\n" + text
    again = load_tokenizer(save_tokenizer(tok, tmp_path / "ckpt"))
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size
    tok.hf.save(str(tmp_path / "tokenizer.json"))  # a plain Hugging Face file given by the user
    local = load_tokenizer(tmp_path / "tokenizer.json")
    assert local.encode(text) == ids and local.sep_id == tok.sep_id


def test_synthetic_checkers():
    assert is_valid_sum("3+4=7") and is_valid_sum("0+0=0") and is_valid_sum("12+9=21")
    for bad in ("3+4=8", "3+4=07", "03+4=7", "3+4", "+4=4", "3-4=-1", ""):
        assert not is_valid_sum(bad), bad
    assert is_balanced("()") and is_balanced("([])[]") and is_balanced("[[()]]")
    for bad in ("", "(", ")(", "(]", "([)]", "(a)"):
        assert not is_balanced(bad), bad
    docs, labels = synthetic_documents("synthetic", num_docs=500, seed=1)
    assert all(check_synthetic(d, lab) for d, lab in zip(docs, labels))
    assert set(labels) == {"sums", "brackets"}
    assert not check_synthetic("()", "sums")


def test_pack_split_and_no_verbatim_overlap():
    ds = build_text_dataset("synthetic-sums", 24, synthetic_docs=4000, val_fraction=0.2, num_val_blocks=3)
    tok = ds.tokenizer
    assert ds.train.dtype == torch.long and ds.train.shape[1] == 24 and ds.val.shape[1] == 24
    # Separators between documents: every complete piece of a chunk is one document.
    for row in ds.train[:20].tolist():
        assert all(is_valid_sum(tok.decode(seg)) for seg in complete_segments(row, tok.sep_id))
    # About 20 % held out, and no validation chunk occurs verbatim in the training chunks.
    frac = ds.val.shape[0] / (ds.val.shape[0] + ds.train.shape[0])
    assert 0.15 < frac < 0.25
    train_stream = ds.train.reshape(-1)
    assert not verbatim_overlaps(ds.val, [train_stream]).any()
    assert ds.val_chars.tolist() == [len(tok.decode(r)) for r in ds.val.tolist()]


def test_overlap_check_finds_repeats_and_drops_them(tmp_path):
    stream = torch.arange(100)
    chunks = torch.stack([torch.arange(10, 14), torch.tensor([5, 7, 9, 11]), torch.arange(96, 100)])
    # A match must be token-aligned: 256 + 1 shares bytes with neighbours but is not a token match.
    assert verbatim_overlaps(chunks, [stream]).tolist() == [True, False, True]
    assert not verbatim_overlaps(torch.tensor([[1, 0, 0, 0]]), [torch.tensor([256, 0, 0, 0, 0])]).any()
    # A corpus whose held-out tail repeats the head verbatim: those chunks are dropped.
    (tmp_path / "rep.txt").write_text("abcdefgh" * 50 + "the quick brown fox jumps over the lazy dog " * 3)
    ds = build_text_dataset(tmp_path / "rep.txt", 8, val_fraction=0.5)
    assert ds.num_val_overlaps > 0 and ds.num_val_dropped == ds.num_val_overlaps
    assert not verbatim_overlaps(ds.val, [ds.train.reshape(-1)]).any()
    kept = build_text_dataset(tmp_path / "rep.txt", 8, val_fraction=0.5, drop_val_overlaps=False)
    assert kept.val.shape[0] == ds.val.shape[0] + ds.num_val_dropped


def test_sources_jsonl_with_labels_folder_and_pydoc(tmp_path):
    rows = [{"text": f"doc {i} " * 5, "lang": "a" if i % 2 else "b"} for i in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    docs, labels = read_documents(tmp_path / "c.jsonl", label_field="lang")
    assert docs[3] == rows[3]["text"] and labels[:2] == ["b", "a"]
    ds = build_text_dataset(tmp_path / "c.jsonl", 16, label_field="lang", val_fraction=0.2)
    assert ds.class_names == ["a", "b"] and ds.num_classes == 2
    assert ds.train_labels.shape == (ds.train.shape[0],) and set(ds.train_labels.tolist()) == {0, 1}
    for row, lab in zip(ds.train.tolist(), ds.train_labels.tolist()):  # chunks never mix labels
        words = ds.tokenizer.decode(row).split()[1:-1]  # the end words may be cut by the chunk edge
        digits = {int(w) % 2 for w in words if w.isdigit()}
        assert digits <= {1 if ds.class_names[lab] == "a" else 0}
    with pytest.raises(KeyError, match="no field 'body'"):
        read_documents(tmp_path / "c.jsonl", text_field="body")
    for name in ("pos", "neg"):
        (tmp_path / "f" / name).mkdir(parents=True)
        (tmp_path / "f" / name / "1.txt").write_text(name * 3)
    docs, labels = read_documents(tmp_path / "f")
    assert labels == ["neg", "pos"] and docs == ["negnegneg", "pospospos"]
    docs, labels = read_documents("pydoc")
    assert len(docs) > 50 and labels is None and any("for" in d for d in docs)
    with pytest.raises(FileNotFoundError, match="built-in corpus"):
        read_documents(tmp_path / "missing.txt")


def test_pack_stream_and_complete_segments():
    assert pack_stream(torch.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert complete_segments([1, 9, 2, 3, 9, 9, 4, 9, 5], sep_id=9) == [[2, 3], [], [4]]
    assert complete_segments([1, 2, 3], sep_id=9) == []


def test_tokenizer_save_is_atomic(tmp_path, monkeypatch):
    import os

    tok = CharTokenizer.fit(["abc"])
    save_tokenizer(tok, tmp_path)
    before = (tmp_path / "text_tokenizer.json").read_text()

    def crash(src, dst):  # the process dies between writing the temp file and the rename
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_tokenizer(CharTokenizer.fit(["xyz"]), tmp_path)
    assert (tmp_path / "text_tokenizer.json").read_text() == before  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["text_tokenizer.json"]  # no temp file left
