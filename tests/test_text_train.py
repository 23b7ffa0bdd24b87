"""Tiny text models trained by the shared trainer (``ditkit.train.loop.train``, recipe ``text_sums``)
reach a stated validity on the synthetic sums language.

Bars were set from measured runs on a shared 2-core CPU (2 layers x 64, 24-token chunks, batch 32,
AdamW 3e-3, 300 steps, ~11 s each), sampling with the EMA weights, seeds 0-1 through the trainer
(and seeds 0-2 with the earlier plain loop, which gave the same ranges):

* AR: 0.91-0.99 of generated sums correct -> bar 0.6.
* MDLM: 0.68-0.74 well-formed ``a+b=c`` documents but only 0-0.05 correct sums; NELBO 1.92-1.96
  bpc against a unigram entropy of 3.46 -> bars: well-formed 0.4, bound < 2.4 bpc.
* MDLM, 2000 steps (slow; ~45 s in the plain loop, ~90 s through the trainer on a busy CPU):
  0.13-0.18 correct sums (plain loop, raw weights) -> bar 0.08. Masked diffusion learns this
  small-scale arithmetic far more slowly than AR (the any-order task is harder), as the issue warned
  for brackets.

``train.keep_best`` (the benchmark's best-validation checkpoint) is tested here on the same tiny
runs: which checkpoint survives pruning and resume, and that it holds the evaluated weights.
"""

import json
import re
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from ditkit.builders import build_objective
from ditkit.config import ConfigError
from ditkit.data.text import is_valid_sum
from ditkit.data.text_loader import load_text_data
from ditkit.eval.text import fraction_valid, text_likelihood
from ditkit.eval.text_model import TextPeriodicEvaluator
from ditkit.pipelines import load
from ditkit.recipes import get_recipe
from ditkit.train.loop import read_best, train


def well_formed(s: str) -> bool:
    return re.fullmatch(r"[0-9]+\+[0-9]+=[0-9]+", s) is not None


def train_sums(tmp_path, kind: str, steps: int, seed: int = 0):
    cfg = get_recipe("text_sums")
    cfg.objective.kind = kind
    cfg.train.max_steps, cfg.train.ckpt_every, cfg.train.seed = steps, steps, seed
    cfg.run.results_dir, cfg.run.run_name = str(tmp_path), kind
    result = train(cfg, log=lambda message: None)
    assert result.step == steps
    pipe = load(result.run_dir, device="cpu")  # the EMA weights, as sampling uses them
    assert pipe.weights == "ema"
    return pipe


def sample_tokens(pipe, n):
    """``(tokens (n, seq_len), start)`` of samples drawn with seeds 0..n-1."""
    out = pipe(num_samples=n, seed=0)
    return out.tokens, out.start


def validation(cfg, tokenizer, n=64):
    data = load_text_data(cfg.data, tokenizer)
    return data.text.val[:n], data.text.val_chars[:n]


def test_autoregressive_learns_sums(tmp_path):
    pipe = train_sums(tmp_path, "autoregressive", 300)
    model, cfg, tokenizer = pipe.model, pipe.cfg, pipe.tokenizer
    out, start = sample_tokens(pipe, 32)
    assert start == 0 and out.shape == (32, cfg.data.seq_len)
    res = fraction_valid(out, tokenizer, is_valid_sum)
    assert res["num_documents"] >= 64 and res["fraction_valid"] >= 0.6, res
    val, chars = validation(cfg, tokenizer)
    likelihood = text_likelihood(build_objective(cfg), model, val, num_chars=chars)
    assert likelihood.exact and likelihood.bits_per_char < 1.6


def test_masked_diffusion_learns_the_format_of_sums(tmp_path):
    pipe = train_sums(tmp_path, "masked", 300)
    model, cfg, tokenizer = pipe.model, pipe.cfg, pipe.tokenizer
    out, _ = sample_tokens(pipe, 32)
    assert not (out == tokenizer.mask_id).any()
    assert fraction_valid(out, tokenizer, well_formed)["fraction_valid"] >= 0.4
    val, chars = validation(cfg, tokenizer)
    bound = text_likelihood(build_objective(cfg), model, val, num_chars=chars, num_passes=2,
                            generator=torch.Generator().manual_seed(0))
    assert not bound.exact and bound.bits_per_char < 2.4


@pytest.mark.slow
def test_masked_diffusion_learns_some_sums(tmp_path):
    pipe = train_sums(tmp_path, "masked", 2000)
    tokenizer = pipe.tokenizer
    out, _ = sample_tokens(pipe, 64)
    res = fraction_valid(out, tokenizer, is_valid_sum)
    assert res["fraction_valid"] >= 0.08, res


class ScriptedEvaluator:
    """Stands in for ``TextPeriodicEvaluator``: reports the next value of ``VALUES`` as the
    validation bpc, so which evaluation is best is known in advance. The iterator lives on the class,
    so a resumed run (a new evaluator) continues the script."""

    VALUES: Iterator[float] = iter(())

    def __init__(self, cfg, dataset, **kwargs):
        pass

    def __call__(self, model):
        return {"val_bits_per_char": next(type(self).VALUES), "eval_seconds": 0.0}


def keep_best_config(tmp_path, name, steps):
    cfg = get_recipe("text_sums")  # constant learning rate: the first 10 of 20 steps equal a 10-step run
    cfg.train.max_steps, cfg.train.ckpt_every, cfg.train.keep_last, cfg.train.log_every = steps, steps, 1, 5
    cfg.train.eval_every, cfg.train.eval_samples, cfg.train.keep_best = 5, 16, True
    cfg.data.synthetic_docs = 600
    cfg.run.results_dir, cfg.run.run_name = str(tmp_path), name
    return cfg


def test_keep_best_keeps_the_best_evaluated_checkpoint_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setattr("ditkit.eval.text_model.TextPeriodicEvaluator", ScriptedEvaluator)
    # evaluations at steps 5, 10, 15 | resume | 20: the best is step 10, and the resumed run must not
    # forget it (a fresh search would crown step 20's 4.0)
    ScriptedEvaluator.VALUES = iter([3.0, 1.0, 2.0, 4.0])
    first = train(keep_best_config(tmp_path, "best", 20), stop_at_step=15, log=lambda m: None)
    assert first.step == 15 and read_best(first.run_dir)["step"] == 10
    result = train(keep_best_config(tmp_path, "best", 20), resume=first.run_dir, log=lambda m: None)
    assert result.step == 20
    best = read_best(result.run_dir)
    assert best == {"step": 10, "metric": "val_bits_per_char", "value": 1.0, "checkpoint": "step_0000010"}
    # keep_last=1 prunes everything but the newest checkpoint and the best one
    assert sorted(p.name for p in (result.run_dir / "checkpoints").iterdir()) == ["step_0000010", "step_0000020"]
    assert read_best(result.run_dir, max_step=5) is None  # a resume from before the best forgets it

    # the kept checkpoint holds the weights of step 10: a 10-step run ends with the same EMA
    ScriptedEvaluator.VALUES = iter([5.0, 5.0])
    short = train(keep_best_config(tmp_path, "short", 10), log=lambda m: None)
    a = load_file(str(result.run_dir / "checkpoints" / "step_0000010" / "ema.safetensors"))
    b = load_file(str(short.checkpoint / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(str(result.checkpoint / "ema.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the control: step 20 differs


def test_keep_best_with_the_text_evaluator_reproduces_the_logged_value(tmp_path):
    # The real evaluator end to end: best.json names the checkpoint of the lowest logged bpc, and
    # re-scoring that checkpoint gives the logged value. (Here the best is usually the last step;
    # the save-on-improvement path mid-run is covered by the scripted-evaluator test above.)
    cfg = keep_best_config(tmp_path, "real", 30)
    cfg.train.eval_every, cfg.train.eval_samples = 10, 64
    result = train(cfg, log=lambda m: None)
    evals = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
             if "val_bits_per_char" in line]
    assert [e["step"] for e in evals] == [10, 20, 30]
    best = read_best(result.run_dir)
    logged = min(evals, key=lambda e: e["val_bits_per_char"])
    assert best["step"] == logged["step"] and best["value"] == logged["val_bits_per_char"]
    pipe = load(result.run_dir / "checkpoints" / best["checkpoint"], device="cpu")
    again = TextPeriodicEvaluator(pipe.cfg, load_text_data(pipe.cfg.data, pipe.tokenizer), log=lambda m: None)(pipe.model)
    assert again["val_bits_per_char"] == pytest.approx(logged["val_bits_per_char"], rel=1e-6)


def test_keep_best_needs_evaluations():
    cfg = get_recipe("text_sums")
    cfg.train.keep_best = True
    with pytest.raises(ConfigError, match="set train.eval_every"):
        cfg.validate()


def test_a_text_model_fine_tunes_from_a_text_run_with_its_tokenizer(tmp_path):
    """--init-from a ditkit text run onto a user's own corpus: the new run reads the source's tokenizer,
    whose ids the embeddings were trained on (a tokenizer fitted on this smaller corpus would have
    fewer rows), and ``init_from`` loads the source's EMA weights into a TextDiT (it read every source
    as a class DiT before)."""
    from ditkit.builders import build_model

    base = train(dataclass_run(tmp_path, "base", steps=2), log=lambda message: None)
    corpus = tmp_path / "mine.txt"
    corpus.write_text("".join(f"{a}+{a}={2 * a}\n" for a in range(1, 5)) * 40, encoding="utf-8")
    cfg = dataclass_run(tmp_path, "tuned", steps=2)
    cfg.data.dataset, cfg.train.init_from = str(corpus), str(base.run_dir)
    with pytest.raises(ConfigError, match=r"character '\\n' is not in the vocabulary"):  # the source never saw it
        train(cfg, log=lambda message: None)
    corpus.write_text("".join(f"{a}+{b}={a + b}" for a in range(1, 60) for b in range(1, 30)), encoding="utf-8")
    tuned = train(cfg, log=lambda message: None)
    assert (tuned.run_dir / "text_tokenizer.json").read_text() == (base.run_dir / "text_tokenizer.json").read_text()
    assert json.loads((tuned.run_dir / "init_from.json").read_text())["kind"] == "ditkit"
    fresh = build_model(load(tuned.run_dir, device="cpu").cfg)
    from ditkit.interop import init_from

    init_from(fresh, base.run_dir)
    base_ema = load_file(sorted((base.run_dir / "checkpoints").iterdir())[-1] / "ema.safetensors")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in base_ema.items())


def dataclass_run(tmp_path, name, steps):
    cfg = get_recipe("text_sums")
    cfg.train.max_steps, cfg.train.ckpt_every = steps, steps
    cfg.run.results_dir, cfg.run.run_name = str(tmp_path), name
    return cfg
