"""Style / topic conditioning for text (issue 23): the built-in style corpus from Python's own text,
labelled folders (non-UTF-8 files, empty folders, JSONL without text), the local style judge, and a
label-conditional block-diffusion run sampled with classifier-free guidance."""

import json
import warnings

import pytest
import torch

from ditkit.data.text import build_text_dataset, python_style_documents, read_documents, write_style_corpus
from ditkit.eval.text import StyleClassifier, style_accuracy


@pytest.fixture(scope="module")
def styles():
    return python_style_documents(max_chars_per_style=40_000)


def test_style_corpus_has_three_balanced_styles(styles):
    docs, labels = styles
    assert sorted(set(labels)) == ["code", "docstring", "reference"]
    sizes = {name: sum(len(d) for d, lab in zip(docs, labels) if lab == name) for name in set(labels)}
    assert all(35_000 <= n <= 40_000 for n in sizes.values()), sizes
    code = [d for d, lab in zip(docs, labels) if lab == "code"]
    assert any("def " in d for d in code) and not any('"""' in d for d in code)  # docstrings removed
    assert python_style_documents(max_chars_per_style=40_000) == styles  # deterministic


def test_style_folder_trains_with_labels_and_skips_non_utf8(tmp_path, styles):
    folder = write_style_corpus(tmp_path / "styles", max_chars_per_style=20_000)
    (folder / "code" / "bad.txt").write_bytes(b"caf\xe9 latin-1 \xff")
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) that are not UTF-8 text: .*bad.txt"):
        ds = build_text_dataset(folder, 64, "char")
    assert ds.class_names == ["code", "docstring", "reference"]
    assert set(ds.train_labels.tolist()) == {0, 1, 2} and set(ds.val_labels.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match=r"bad.txt is not UTF-8 text"):
        read_documents(folder, strict=True)


def test_bad_corpora_give_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt files"):
        read_documents(tmp_path / "empty")
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "a.txt").write_bytes(b"\xff\xfe\xfa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no UTF-8 .txt files"):
            read_documents(only_bad)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "ok", "label": "a"}) + "\n" + json.dumps({"text": " ", "label": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2 has an empty 'text'"):
        read_documents(jsonl, label_field="label")
    jsonl.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match=r"d.jsonl:1 has no field 'text'"):
        read_documents(jsonl)


def test_style_judge_separates_generated_styles_and_python_styles(styles):
    shout = ["THE CAT SAT ON THE MAT.", "A DOG RAN FAST!", "WHO IS THERE?"] * 5
    quiet = ["the cat sat on the mat.", "a dog ran fast!", "who is there?"] * 5
    clf = StyleClassifier(2).fit(shout + quiet, [0] * 15 + [1] * 15)
    assert clf.predict(["A BIRD FLEW.", "a bird flew."]) == [0, 1]
    docs, labels = styles
    names = sorted(set(labels))
    chunks, ys, held = [], [], []
    for i, (doc, lab) in enumerate(zip(docs, labels)):
        for j in range(0, len(doc) - 128, 128):
            chunks.append(doc[j : j + 128])
            ys.append(names.index(lab))
            held.append(i % 5 == 0)  # whole documents held out
    train = [(c, y) for c, y, h in zip(chunks, ys, held) if not h]
    test = [(c, y) for c, y, h in zip(chunks, ys, held) if h]
    judge = StyleClassifier(3).fit([c for c, _ in train], [y for _, y in train])
    # measured 0.87 on 128-character chunks of whole held-out documents (docstring vs reference
    # prose are the confusable pair); chance is 0.33
    assert judge.accuracy([c for c, _ in test], [y for _, y in test]) > 0.75
    report = style_accuracy(judge, [c for c, _ in test[:30]], [y for _, y in test[:30]])
    assert set(report) == {"style_accuracy", "per_label", "num_samples"} and report["num_samples"] == 30


def test_label_conditional_block_model_with_guidance(tmp_path):
    """Sums vs brackets (the labelled ``synthetic`` corpus): a 150-step BD3-LM run with label
    dropout, sampled per label with and without guidance; measured style accuracy 1.0 at guidance
    1 and 2 (the judge: 1.0 on held-out chunks)."""
    from ditkit.config import ConfigError
    from ditkit.data.text_loader import load_text_data
    from ditkit.eval.text_model import style_judge
    from ditkit.pipelines import load
    from ditkit.recipes import get_recipe
    from ditkit.train.loop import train

    cfg = get_recipe("text_sums_bd3")
    cfg.data.dataset, cfg.model.class_dropout_prob = "synthetic", 0.2
    cfg.train.max_steps, cfg.train.ckpt_every = 150, 150
    cfg.run.results_dir, cfg.run.run_name = str(tmp_path), "styles"
    pipe = load(train(cfg, log=lambda message: None).run_dir, device="cpu")
    assert pipe.class_names == ["brackets", "sums"]
    judge, judge_accuracy = style_judge(load_text_data(pipe.cfg.data, pipe.tokenizer))
    assert judge_accuracy > 0.95
    out = pipe(class_labels=["sums", "brackets"] * 4, guidance_scale=2.0, num_inference_steps=6, at_document_start=False)
    plain = pipe(class_labels=["sums", "brackets"] * 4, guidance_scale=2.0, num_inference_steps=6,
                 at_document_start=False, kv_cache=False)
    assert torch.equal(out.tokens, plain.tokens)  # the KV cache holds both halves of the guided batch
    assert style_accuracy(judge, out.texts, out.labels)["style_accuracy"] >= 0.75
    with pytest.raises(ConfigError, match="brackets"):
        pipe(class_labels=["poems"])
