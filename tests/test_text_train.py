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
"""

import re

import pytest
import torch

from ditkit.data.text import is_valid_sum
from ditkit.data.text_loader import load_text_data
from ditkit.eval.text import fraction_valid, text_likelihood
from ditkit.recipes import get_recipe
from ditkit.text_sampling import build_text_objective, load_text_model, sample_text
from ditkit.train.loop import train


def well_formed(s: str) -> bool:
    return re.fullmatch(r"[0-9]+\+[0-9]+=[0-9]+", s) is not None


def train_sums(tmp_path, kind: str, steps: int, seed: int = 0):
    cfg = get_recipe("text_sums")
    cfg.objective.kind = kind
    cfg.train.max_steps, cfg.train.ckpt_every, cfg.train.seed = steps, steps, seed
    cfg.run.results_dir, cfg.run.run_name = str(tmp_path), kind
    result = train(cfg, log=lambda message: None)
    assert result.step == steps
    model, cfg, _, tokenizer = load_text_model(result.run_dir)  # the EMA weights, as sampling uses them
    return model, cfg, tokenizer


def validation(cfg, tokenizer, n=64):
    data = load_text_data(cfg.data, tokenizer)
    return data.text.val[:n], data.text.val_chars[:n]


def test_autoregressive_learns_sums(tmp_path):
    model, cfg, tokenizer = train_sums(tmp_path, "autoregressive", 300)
    out, start = sample_text(model, cfg, tokenizer, list(range(32)))
    assert start == 0 and out.shape == (32, cfg.data.seq_len)
    res = fraction_valid(out, tokenizer, is_valid_sum)
    assert res["num_documents"] >= 64 and res["fraction_valid"] >= 0.6, res
    val, chars = validation(cfg, tokenizer)
    likelihood = text_likelihood(build_text_objective(cfg), model, val, num_chars=chars)
    assert likelihood.exact and likelihood.bits_per_char < 1.6


def test_masked_diffusion_learns_the_format_of_sums(tmp_path):
    model, cfg, tokenizer = train_sums(tmp_path, "masked", 300)
    out, _ = sample_text(model, cfg, tokenizer, list(range(32)))
    assert not (out == tokenizer.mask_id).any()
    assert fraction_valid(out, tokenizer, well_formed)["fraction_valid"] >= 0.4
    val, chars = validation(cfg, tokenizer)
    bound = text_likelihood(build_text_objective(cfg), model, val, num_chars=chars, num_passes=2,
                            generator=torch.Generator().manual_seed(0))
    assert not bound.exact and bound.bits_per_char < 2.4


@pytest.mark.slow
def test_masked_diffusion_learns_some_sums(tmp_path):
    model, cfg, tokenizer = train_sums(tmp_path, "masked", 2000)
    out, _ = sample_text(model, cfg, tokenizer, list(range(64)))
    res = fraction_valid(out, tokenizer, is_valid_sum)
    assert res["fraction_valid"] >= 0.08, res
