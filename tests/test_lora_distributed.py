"""LoRA under DDP (issue 19): two processes (torchrun, gloo on the CPU) train the same adapter as
one process at the same global batch, and only rank 0 writes the adapter checkpoints."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

import ditkit.train.loop as loop  # noqa: E402
from ditkit.recipes import get_recipe  # noqa: E402
from test_distributed import _torchrun  # noqa: E402  (torchrun --nproc-per-node 2 in its own process group)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a torchrun launch: .ci/run's second step

ATOL = 1e-5  # fp32, 4 AdamW steps: measured differences between one and two processes are ~1e-7


def _cfg(results_dir: Path, run_name: str, **train):
    cfg = get_recipe("shapes_tiny")
    cfg.run.results_dir, cfg.run.run_name = str(results_dir), run_name
    cfg.data.num_items, cfg.data.hflip = 40, True
    cfg.model.class_dropout_prob = 0.5
    cfg.train.global_batch_size, cfg.train.grad_accum_steps = 8, 2
    cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.lr_schedule = 4, 1, "cosine"
    cfg.train.log_every, cfg.train.ckpt_every, cfg.train.lr, cfg.train.precision = 2, 100, 1e-2, "fp32"
    cfg.sample.num_sampling_steps = 3
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_ddp_lora_trains_the_adapter_of_one_process(tmp_path):
    quiet = lambda message: None  # noqa: E731
    base = loop.train(_cfg(tmp_path, "base", max_steps=2), log=quiet)
    lora = dict(init_from=str(base.run_dir), lora_rank=4, lora_targets="attn,mlp,adaLN")
    one = loop.train(_cfg(tmp_path, "one", **lora), log=quiet)
    config = tmp_path / "ddp.json"
    config.write_text(_cfg(tmp_path, "ddp", **lora).to_json())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _torchrun(["-m", "ditkit", "train", "--config", str(config)], cwd)

    ddp_ckpt, one_ckpt = tmp_path / "ddp" / "checkpoints" / "step_0000004", one.checkpoint
    assert not (ddp_ckpt / "model.safetensors").exists()  # adapters only, written once (rank 0)
    assert not list((tmp_path / "ddp").glob("**/*rank1*"))
    for folder in ("adapter", "ema_adapter"):
        a = load_file(str(ddp_ckpt / folder / "adapter_model.safetensors"))
        b = load_file(str(one_ckpt / folder / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=ATOL, msg=key)
    trained = load_file(str(ddp_ckpt / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in trained.items())  # it trained
