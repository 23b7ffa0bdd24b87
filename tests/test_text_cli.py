"""``ditkit train / sample / eval`` end to end on text (the synthetic sums corpus), for masked
diffusion and the autoregressive baseline; exact resume of a text run; the promised errors."""

import json
from pathlib import Path
import random

import pytest
import torch
from safetensors.torch import load_file

import ditkit.train.loop as loop
from ditkit.cli import main
from ditkit.config import ConfigError
from ditkit.data.text_loader import TextBatchSampler
from ditkit.data.tokenizers import TOKENIZER_FILE, CharTokenizer, load_tokenizer
from ditkit.recipes import get_recipe
from ditkit.builders import build_model
from ditkit.pipelines.text import TextPipeline
from ditkit.train.checkpoint import latest_checkpoint

TINY = ["train", "--recipe", "text_sums", "--max-steps", "6", "--ckpt-every", "3", "--log-every", "3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    assert main([*TINY, "--results-dir", str(root), "--run-name", "masked", "--sample-every", "6",
                 "--set", "train.eval_every=3", "--set", "train.eval_samples=40"]) == 0
    assert main([*TINY, "--results-dir", str(root), "--run-name", "ar", "--set", "objective.kind=autoregressive"]) == 0
    return {"masked": root / "masked", "ar": root / "ar"}


def read_samples(out_dir):
    lines = (out_dir / "samples.jsonl").read_text().splitlines()
    return json.loads(lines[0])["metadata"], [json.loads(line) for line in lines[1:]]


def test_train_saves_the_tokenizer_in_every_checkpoint_and_text_samples(runs):
    run = runs["masked"]
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_0000003", "step_0000006"]
    for ckpt in ckpts:
        tokenizer = load_tokenizer(ckpt / TOKENIZER_FILE)
        assert tokenizer.decode(tokenizer.encode("12+7=19")) == "12+7=19"
        saved = json.loads((ckpt / "config.json").read_text())
        assert saved["data"]["vocab_size"] == tokenizer.vocab_size == 13  # digits, + and =, separator
        assert saved["objective"]["kind"] == "masked" and saved["model"]["name"] == "TextDiT-T"
    text = (run / "samples" / "step_0000006.txt").read_text()
    assert text.count("==== step_0000006 sample") == 8
    body = [line for line in text.splitlines() if not line.startswith("====")]
    assert body and not any("_" in line for line in body)  # no mask left (it renders as _)
    assert json.loads((runs["ar"] / "config.json").read_text())["objective"]["kind"] == "autoregressive"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_bits_per_char" in line]
    assert [e["step"] for e in evals] == [3, 6] and all(e["eval_sequences"] == 40 for e in evals)
    assert all(2.0 < e["val_bits_per_char"] < 6.0 and e["val_bits_per_char_stderr"] > 0 for e in evals)


def test_classifier_free_guidance_on_labels_is_one_batched_forward_and_changes_the_text():
    cfg = get_recipe("text_sums")
    cfg.data.vocab_size, cfg.data.num_classes, cfg.data.seq_len = 9, 2, 12
    tokenizer = CharTokenizer("abcdefgh")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a trained-looking model: labels move the logits (init zeroes the output layer)
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    batches = []
    model.register_forward_hook(lambda module, inputs, output: batches.append(inputs[0].shape[0]))
    pipe = TextPipeline(model, cfg, tokenizer=tokenizer)
    labels = [0, 1, 0, 1]
    plain = pipe(class_labels=labels, guidance_scale=1.0, num_inference_steps=4, seed=0).tokens
    assert set(batches) == {4}
    batches.clear()
    guided = pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=4, seed=0).tokens
    assert set(batches) == {8}  # conditional and null-label halves in one forward
    assert not torch.equal(plain, guided) and not (guided == tokenizer.mask_id).any()


@pytest.mark.parametrize("kind", ["masked", "ar"])
def test_sample_with_a_prompt_is_reproducible_and_independent_of_the_batch(runs, tmp_path, kind, capsys):
    args = ["sample", "--ckpt", str(runs[kind]), "--prompt", "3+4=", "--num-samples", "3", "--num-tokens", "10",
            "--num-sampling-steps", "5", "--seed", "7"]
    assert main([*args, "--out-dir", str(tmp_path / "a")]) == 0
    assert main([*args, "--out-dir", str(tmp_path / "b"), "--batch-size", "1"]) == 0
    meta, rows = read_samples(tmp_path / "a")
    assert meta["prompt"] == "3+4=" and meta["sampler"] == ("ancestral" if kind == "masked" else "autoregressive")
    assert [r["seed"] for r in rows] == [7, 8, 9]
    for row in rows:
        assert row["text"].startswith("3+4=") and len(row["text"]) == 10, row  # char model: a token is a char
    assert rows == read_samples(tmp_path / "b")[1]  # per-sample seeds: the batch does not matter
    assert "3+4=" in capsys.readouterr().out


def test_infill_keeps_the_template_and_fills_every_mark(runs, tmp_path):
    out = tmp_path / "infill"
    assert main(["sample", "--ckpt", str(runs["masked"]), "--infill", "12+__=19", "--num-samples", "4",
                 "--out-dir", str(out)]) == 0
    _, rows = read_samples(out)
    for row in rows:
        text = row["text"]
        assert len(text) == 8 and text[:3] == "12+" and text[5:] == "=19" and "_" not in text, text


def test_masked_sampling_goes_beyond_the_training_window(runs, tmp_path):
    out = tmp_path / "long"
    assert main(["sample", "--ckpt", str(runs["masked"]), "--num-tokens", "40", "--num-samples", "2",
                 "--num-sampling-steps", "4", "--out-dir", str(out)]) == 0  # seq_len is 24
    _, rows = read_samples(out)
    assert [len(r["text"]) for r in rows] == [40, 40] and all("_" not in r["text"] for r in rows)


def test_eval_prints_bits_per_char_json(runs, tmp_path, capsys):
    for kind in ("masked", "ar"):
        out = tmp_path / f"{kind}.json"
        assert main(["eval", "--ckpt", str(runs[kind]), "--num-samples", "8", "--num-passes", "3",
                     "--max-val-sequences", "40", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        results = json.loads(printed[: printed.rindex("}") + 1])
        assert results == json.loads(out.read_text())
        lik, samples = results["likelihood"], results["samples"]
        assert lik["num_sequences"] == 40 and lik["num_chars"] == 40 * 24
        # After 6 steps both models sit near the unigram entropy (3.46 bits), far below uniform + slack.
        assert 2.0 < lik["bits_per_char"] < 6.0
        if kind == "masked":
            assert not lik["exact"] and lik["num_passes"] == 3 and lik["stderr_bits_per_char"] > 0
        else:
            assert lik["exact"] and lik["stderr_bits_per_char"] == 0
        assert 0.0 <= samples["fraction_valid"] <= 1.0 and samples["num_documents"] > 0
        assert samples["tokens_per_s"] > 0 and 0 < samples["distinct_2"] <= 1


def test_text_errors_stop_with_the_fix(runs, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(runs["ar"]), "--infill", "1+__=3", "--out-dir", str(tmp_path)]) == 2
    assert "--suffix and --infill need a masked model" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(runs["masked"]), "--npz", "--out-dir", str(tmp_path)]) == 2
    assert "--npz is for image" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(runs["masked"]), "--sampler", "ddim", "--out-dir", str(tmp_path)]) == 2
    assert "use ancestral" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(runs["masked"]), "--class-labels", "1", "--out-dir", str(tmp_path)]) == 2
    assert "unconditional" in capsys.readouterr().err
    image_run = Path(__file__).parent / "fixtures" / "outputs" / "image_ckpt"  # ditkit sample on an image checkpoint
    assert main(["sample", "--ckpt", str(image_run), "--prompt", "3+4=", "--out-dir", str(tmp_path / "i")]) == 2
    assert "--prompt is for text, text-to-image and text-to-video models: this checkpoint is an image model" in capsys.readouterr().err
    assert main(["train", "--recipe", "digits", "--set", "objective.kind=masked", "--print-config"]) == 2
    assert "--model DiT-XS/4 is an image model but objective.kind=masked trains text" in capsys.readouterr().err
    assert main(["train", "--recipe", "text_sums", "--data", "no/such.txt", "--print-config"]) == 2
    assert "neither a built-in text corpus" in capsys.readouterr().err


def test_text_resume_is_bitwise_exact_and_the_control_catches_a_lost_data_position(tmp_path, monkeypatch):
    """6 steps straight == 3 steps + resume + 3 steps, on the labelled synthetic corpus (label
    dropout draws from torch's global RNG, masking from the noise generator, mid-epoch stop)."""

    def cfg(name):
        c = get_recipe("text_sums")
        c.data.dataset, c.data.synthetic_docs, c.data.seq_len = "synthetic", 600, 16
        c.model.class_dropout_prob = 0.5
        c.train.global_batch_size, c.train.grad_accum_steps = 8, 2
        c.train.max_steps, c.train.warmup_steps, c.train.lr_schedule = 6, 2, "cosine"
        c.train.log_every, c.train.ckpt_every = 3, 100
        c.run.results_dir, c.run.run_name = str(tmp_path), name
        return c

    def weights(run_dir, name="model.safetensors"):
        return load_file(str(latest_checkpoint(run_dir) / name))

    def resume_in_two(name):
        first = loop.train(cfg(name), stop_at_step=3, log=lambda m: None)
        assert first.step == 3
        return loop.train(cfg(name), resume=first.run_dir, log=lambda m: None)

    straight = loop.train(cfg("straight"), log=lambda m: None)
    resumed = resume_in_two("resumed")
    assert straight.step == resumed.step == 6
    assert json.loads((straight.run_dir / "config.json").read_text())["data"]["num_classes"] == 2  # labelled
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(straight.run_dir, name), weights(resumed.run_dir, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # control: a resume that forgets where it was in the data order ends elsewhere
    monkeypatch.setattr(TextBatchSampler, "load_state_dict", lambda self, state: None)
    a, c = weights(straight.run_dir), weights(resume_in_two("control").run_dir)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_shakespeare_char_recipe_takes_its_corpus_from_data(tmp_path, capsys):
    """The benchmark recipe names no corpus of its own (tinyshakespeare is a benchmark file, not a
    dependency): without --data it stops with the fix; with --data it trains both objectives with the
    benchmark's settings, evaluating and keeping the best checkpoint."""
    cfg = get_recipe("shakespeare_char")
    assert "shared" not in cfg.data.dataset and cfg.data.dataset.startswith("path/")
    assert main(["train", "--recipe", "shakespeare_char", "--print-config"]) == 2
    assert "fix --data" in capsys.readouterr().err
    rng = random.Random(0)  # varied text: no validation chunk repeats a training one
    words = ["thou", "art", "king", "my", "lord", "sweet", "night", "what", "say", "you", "to", "me"]
    corpus = tmp_path / "plays.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(9)) for _ in range(400)))
    for kind in ("masked", "autoregressive"):
        assert main(["train", "--recipe", "shakespeare_char", "--data", str(corpus), "--max-steps", "4",
                     "--set", "train.eval_every=2", "--set", "train.eval_samples=16", "--set", f"objective.kind={kind}",
                     "--results-dir", str(tmp_path), "--run-name", kind]) == 0
        saved = json.loads((tmp_path / kind / "config.json").read_text())
        assert saved["recipe"] == "shakespeare_char" and saved["objective"]["kind"] == kind
        assert saved["data"]["dataset"] == str(corpus) and saved["data"]["seq_len"] == 64
        assert saved["model"]["name"] == "TextDiT-T" and saved["train"]["global_batch_size"] == 32
        best = json.loads((tmp_path / kind / "best.json").read_text())
        assert best["metric"] == "val_bits_per_char" and (tmp_path / kind / "checkpoints" / best["checkpoint"]).is_dir()
