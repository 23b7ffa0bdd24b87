"""LoRA under DDP and FSDP2 (issue 19): two processes (torchrun, gloo on the CPU) train the same
adapter as one process at the same global batch, only rank 0 writes the adapter checkpoints, and an
FSDP2 LoRA checkpoint resumes on one process or on two (and a one-process one on two)."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

import ditkit.train.loop as loop  # noqa: E402
from ditkit.recipes import get_recipe  # noqa: E402
from ditkit.train.checkpoint import load_training_state  # noqa: E402
from test_distributed import _copy_run, _torchrun  # noqa: E402  (torchrun --nproc-per-node 2 in its own process group)

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


def _assert_same_adapters(a_ckpt: Path, b_ckpt: Path) -> None:
    for folder in ("adapter", "ema_adapter"):
        a = load_file(str(a_ckpt / folder / "adapter_model.safetensors"))
        b = load_file(str(b_ckpt / folder / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=ATOL, msg=f"{folder}/{key}")


FSDP_WORKER = '''
import json, os, shutil, sys
from pathlib import Path
import torch.distributed as dist
import ditkit.train.loop as loop
from ditkit.config import Config
from ditkit.train.distributed import release_process_group

spec = json.loads(Path(sys.argv[1]).read_text())
dist.init_process_group("gloo")


def run(name, resume=None):
    cfg = Config.from_json(spec["config"])
    cfg.run.run_name, cfg.train.parallel = name, "fsdp"
    assert loop.train(cfg, resume=resume, log=lambda message: None).step == 4


run("fsdp")
if int(os.environ["RANK"]) == 0:  # the FSDP run's step-2 checkpoint, continued on two processes
    src, dst = Path(spec["results"]) / "fsdp", Path(spec["results"]) / "fsdp_to_fsdp"
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_0000004")
dist.barrier()
run("fsdp_to_fsdp", resume=str(Path(spec["results"]) / "fsdp_to_fsdp" / "checkpoints" / "step_0000002"))
run("one_to_fsdp", resume=spec["one_to_fsdp"])
release_process_group()  # gloo's threads end before exit (else an occasional "terminate called" abort)
'''


def test_fsdp_lora_trains_the_adapter_of_one_process_and_resumes_on_any_number_of_processes(tmp_path):
    quiet = lambda message: None  # noqa: E731
    base = loop.train(_cfg(tmp_path, "base", max_steps=2), log=quiet)
    # a LoRA matrix on every linear layer, and the class-label table trained whole (peft's
    # modules_to_save): both kinds of adapter tensor are sharded, gathered and restored
    lora = dict(init_from=str(base.run_dir), lora_rank=4, lora_targets="attn,mlp,adaLN", lora_train_modules="labels",
                ckpt_every=2, keep_last=3)
    one = loop.train(_cfg(tmp_path, "one", **lora), log=quiet)
    config = _cfg(tmp_path, "fsdp", **lora).to_json()
    spec = {"config": config, "results": str(tmp_path),
            "one_to_fsdp": str(_copy_run(one.run_dir, tmp_path / "one_to_fsdp", 2))}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "worker.py").write_text(FSDP_WORKER)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _torchrun([str(tmp_path / "worker.py"), str(tmp_path / "spec.json")], cwd)

    fsdp_ckpt = tmp_path / "fsdp" / "checkpoints" / "step_0000004"
    # the one-process layout: adapters, config, state (optimiser included, numbered as one process numbers it)
    assert sorted(p.name for p in fsdp_ckpt.iterdir()) == ["adapter", "config.json", "ema_adapter", "state.pt"]
    one_state, fsdp_state = load_training_state(one.checkpoint), load_training_state(fsdp_ckpt)
    assert fsdp_state["optimizer"]["param_groups"] == one_state["optimizer"]["param_groups"]
    for index, moments in one_state["optimizer"]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fsdp_state["optimizer"]["state"][index][key], moments[key], rtol=0, atol=ATOL)
    _assert_same_adapters(fsdp_ckpt, one.checkpoint)
    trained = load_file(str(fsdp_ckpt / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in trained.items())  # it trained
    assert any("embedding_table" in k for k in trained)  # the label table, trained whole

    # FSDP step 2 -> one process; FSDP -> FSDP; one process -> FSDP: each continues the same run
    fsdp_to_one = _copy_run(tmp_path / "fsdp", tmp_path / "fsdp_to_one", 2)
    assert loop.train(_cfg(tmp_path, "unused", **lora), resume=fsdp_to_one, log=quiet).step == 4
    for run in ("fsdp_to_one", "fsdp_to_fsdp", "one_to_fsdp"):
        _assert_same_adapters(tmp_path / run / "checkpoints" / "step_0000004", one.checkpoint)
