"""Several processes on the CPU (gloo), launched with torchrun as a subprocess.

One module fixture runs everything once, then the tests read the results:

* in this process: a one-process reference run (6 steps) and the same run stopped at step 3;
* ``torchrun --nproc-per-node 2 -m ditkit train --config ...``: the same run with DDP;
* ``torchrun --nproc-per-node 2 WORKER``: DDP resuming the one-process checkpoint (parameters of
  every rank saved by the worker), FSDP2 from scratch (sharded checkpoints), FSDP2 resuming the
  one-process checkpoint, and ``ditkit sample`` shared by the two ranks;
* back in this process: the 2-process DDP and FSDP2 checkpoints resumed in one process.

The run has label dropout 0.5, random flips, warm-up + cosine, 2 accumulation steps and an epoch
boundary (40 images, batch 8: 5 steps per epoch; the stop at step 3 falls mid-epoch), so the data
order, the diffusion noise and the label dropout must all be shared out exactly for the weights to
match. Sums of gradients over ranks are reassociated, hence ``allclose`` and not bitwise equality.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from ditkit.config import ConfigError
from ditkit.data import EpochBatchSampler, ImageDataset
from ditkit.data.images import DataError
from ditkit.diffusion import AutoregressiveLM, FlowMatching, GaussianDiffusion, MaskedDiffusion, make_schedule
from ditkit.models.dit import DiT
from ditkit.models.layers import LabelEmbedder
from ditkit.models.text_dit import build_text_dit
from ditkit.recipes import get_recipe
from ditkit.train.checkpoint import load_training_state
from ditkit.train.distributed import ShardedBatches, load_training_checkpoint, setup_distributed, sharded_loss
from ditkit.train.ema import EMA
from ditkit.train.loop import train

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
    pytest.mark.slow,  # torchrun launches: .ci/run runs them as its second step
    pytest.mark.timeout(900),
]

REPO = Path(__file__).resolve().parents[1]
STEPS, STOP = 6, 3
ATOL = 1e-5  # fp32, 6 AdamW steps at lr 1e-3: measured differences are ~1e-7


def _config(results_dir: Path, run_name: str):
    cfg = get_recipe("shapes_tiny")
    cfg.run.results_dir, cfg.run.run_name = str(results_dir), run_name
    cfg.data.num_items, cfg.data.hflip = 40, True
    cfg.model.class_dropout_prob = 0.5
    cfg.train.global_batch_size, cfg.train.grad_accum_steps = 8, 2
    cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.lr_schedule = STEPS, 2, "cosine"
    cfg.train.log_every, cfg.train.ckpt_every, cfg.train.keep_last = 2, STOP, 3
    cfg.sample.num_sampling_steps = 3
    return cfg


WORKER = '''
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
import ditkit.train.loop as loop
from ditkit.builders import build_model
from ditkit.cli import main as cli
from ditkit.config import Config
from ditkit.train.distributed import release_process_group

spec = json.loads(Path(sys.argv[1]).read_text())
dist.init_process_group("gloo")  # one group for all the runs below (train and sample use it as it is)
rank = int(os.environ["RANK"])


def run(name, parallel, resume=None, model=None):
    cfg = Config.from_json(spec["config"])
    cfg.run.run_name, cfg.train.parallel = name, parallel
    result = loop.train(cfg, model, resume=resume, log=lambda message: None)
    assert result.step == spec["steps"], result


# a one-process checkpoint continued on two, training a model this rank built (train(cfg, model=...)),
# so that its parameters can be saved afterwards
sized = Config.from_json(spec["config"])
sized.data.channels, sized.data.num_classes = 3, 4
model = build_model(sized)
run("one_to_two", "ddp", resume=spec["one_to_two"], model=model)
torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(spec["out"]) / f"params_rank{rank}.pt")
run("fsdp", "fsdp")
run("one_to_fsdp", "fsdp", resume=spec["one_to_fsdp"])
code = cli(["sample", "--ckpt", spec["sample_ckpt"], "--num-samples", "6", "--seed", "5", "--batch-size", "3",
            "--npz", "--out-dir", spec["sample_out"], "--device", "cpu"])
assert code == 0, code
release_process_group()
'''


def _torchrun(args: list[str], cwd: Path) -> None:
    """``torchrun --nproc-per-node 2 ARGS`` in ``cwd``; fails the test with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    # its own process group, so that a timeout ends the workers too, not only torchrun
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}\n{err[-8000:]}"


def _copy_run(src: Path, dst: Path, keep_step: int) -> Path:
    """A copy of run ``src`` holding only its checkpoint of ``keep_step``; returns that checkpoint."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if ckpt.name != f"step_{keep_step:07d}":
            shutil.rmtree(ckpt)
    return dst / "checkpoints" / f"step_{keep_step:07d}"


def _weights(run_dir: Path, step: int = STEPS, which: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / f"{which}.safetensors"))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=ATOL, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    results = root / "results"
    quiet = lambda message: None  # noqa: E731
    ref = train(_config(results, "ref"), log=quiet)
    one = train(_config(results, "one"), stop_at_step=STOP, log=quiet)
    config = root / "config.json"
    config.write_text(_config(results, "ddp").to_json())

    # the same run on two processes through the ditkit command, in an empty working directory
    cwd = root / "cwd"
    cwd.mkdir()
    _torchrun(["-m", "ditkit", "train", "--config", str(config)], cwd)

    out = root / "worker_out"
    out.mkdir()
    spec = {
        "config": config.read_text(), "steps": STEPS, "out": str(out),
        "one_to_two": str(_copy_run(one.run_dir, results / "one_to_two", STOP)),
        "one_to_fsdp": str(_copy_run(one.run_dir, results / "one_to_fsdp", STOP)),
        "sample_ckpt": str(ref.run_dir), "sample_out": str(root / "samples_two"),
    }
    (root / "spec.json").write_text(json.dumps(spec))
    (root / "worker.py").write_text(WORKER)
    _torchrun([str(root / "worker.py"), str(root / "spec.json")], cwd)

    # two processes -> one: continue the DDP and the FSDP runs from step 3 in this process
    two_to_one = _copy_run(results / "ddp", results / "two_to_one", STOP)
    fsdp_to_one = _copy_run(results / "fsdp", results / "fsdp_to_one", STOP)
    for ckpt in (two_to_one, fsdp_to_one):
        assert train(_config(results, "unused"), resume=ckpt, log=quiet).step == STEPS
    return {"root": root, "results": results, "cwd": cwd, "out": out, "ref": ref.run_dir}


def test_two_processes_give_the_weights_of_one_process_at_the_same_global_batch(runs):
    results, ref = runs["results"], runs["ref"]
    for which in ("model", "ema"):
        _assert_close(_weights(results / "ddp", which=which), _weights(ref, which=which))
        _assert_close(_weights(results / "fsdp", which=which), _weights(ref, which=which))
    # the logged loss is the mean over both ranks: the one-process loss of the same samples
    ref_log = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    ddp_log = [json.loads(line) for line in (results / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ddp_log] == [m["step"] for m in ref_log] == [2, 4, 6]
    for a, b in zip(ddp_log, ref_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # the data position, the noise generator and torch's RNG end where one process ends
    ref_state, state = load_training_state(ref / "checkpoints" / "step_0000006"), load_training_state(results / "ddp" / "checkpoints" / "step_0000006")
    assert state["data"] == ref_state["data"]
    assert torch.equal(state["rng"]["noise"], ref_state["rng"]["noise"]) and torch.equal(state["rng"]["torch_cpu"], ref_state["rng"]["torch_cpu"])


def test_every_rank_holds_the_same_parameters(runs):
    rank0 = torch.load(runs["out"] / "params_rank0.pt", weights_only=True)
    rank1 = torch.load(runs["out"] / "params_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    _assert_close(rank0, _weights(runs["ref"]))


def test_only_rank_zero_writes_files(runs):
    results = runs["results"]

    def tree(run: Path) -> list[str]:
        return sorted(str(p.relative_to(run)) for p in run.rglob("*"))

    assert tree(results / "ddp") == tree(runs["ref"])  # the files of one process, nothing more
    assert list(runs["cwd"].iterdir()) == []
    fsdp_ckpt = results / "fsdp" / "checkpoints" / "step_0000003"
    assert sorted(p.name for p in fsdp_ckpt.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors", "sharded", "state.pt"]
    assert sorted(p.name for p in (fsdp_ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "optimizer" not in load_training_state(fsdp_ckpt)  # it lives in the shards


def test_checkpoints_resume_on_another_number_of_processes_continuing_the_same_run(runs):
    results, ref = runs["results"], runs["ref"]
    for run in ("one_to_two", "two_to_one", "one_to_fsdp", "fsdp_to_one"):  # 1 -> 2 and 2 -> 1, DDP and FSDP2
        for which in ("model", "ema"):
            _assert_close(_weights(results / run, which=which), _weights(ref, which=which))
        assert load_training_state(results / run / "checkpoints" / "step_0000006")["data"] == load_training_state(
            ref / "checkpoints" / "step_0000006"
        )["data"]


def test_fsdp_sharded_checkpoint_loads_into_an_unsharded_model(runs):
    ckpt = runs["results"] / "fsdp" / "checkpoints" / "step_0000003"
    cfg = _config(runs["results"], "x")
    cfg.data.channels, cfg.data.num_classes = 3, 4
    from ditkit.builders import build_model

    torch.manual_seed(123)  # weights unlike the checkpoint's, so a load that does nothing fails
    model = build_model(cfg)
    ema = EMA(model, 0.99)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2]}])
    load_training_checkpoint(ckpt, model, ema.model, optimizer, load_training_state(ckpt))
    gathered = load_file(str(ckpt / "model.safetensors"))  # rank 0's gather of the same shards
    for key, value in model.state_dict().items():
        assert torch.equal(value, gathered[key]), key
    _assert_close(model.state_dict(), _weights(runs["ref"], step=STOP))  # and the one-process weights
    _assert_close(ema.model.state_dict(), _weights(runs["ref"], step=STOP, which="ema"))
    exp_avg = {id(p): optimizer.state[p]["exp_avg"] for p in params}
    ref_state = load_training_state(runs["ref"] / "checkpoints" / "step_0000003")["optimizer"]["state"]
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        torch.testing.assert_close(exp_avg[id(p)], ref_state[i]["exp_avg"], rtol=0, atol=ATOL)


def test_distributed_sampling_equals_one_process_with_the_same_seeds(runs):
    from ditkit.media import to_uint8
    from ditkit.pipelines import load

    two = np.load(runs["root"] / "samples_two" / "samples.npz")
    one = load(runs["ref"], device="cpu")(num_samples=6, seed=5, batch_size=3)
    assert two["arr_0"].shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(two["arr_0"], to_uint8(one.tensors))
    np.testing.assert_array_equal(two["arr_1"], np.asarray(one.labels))


# ---- in-process pieces -----------------------------------------------------------------------------


def _tiny_dit(learn_sigma: bool) -> DiT:
    return DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2,
               num_classes=4, class_dropout_prob=0.5, learn_sigma=learn_sigma)


@pytest.mark.parametrize("kind", ["gaussian", "flow", "masked", "autoregressive"])
def test_sharded_loss_shares_out_the_noise_and_label_dropout_of_one_process(kind):
    torch.manual_seed(0)
    if kind in ("gaussian", "flow"):
        model = _tiny_dit(learn_sigma=kind == "gaussian")
        objective = GaussianDiffusion(make_schedule("linear", 1000), learn_sigma=True) if kind == "gaussian" else FlowMatching("logit_normal")
        x = torch.randn(8, 3, 8, 8)
    else:
        model = build_text_dit("TextDiT-T", 11, hidden_size=32, depth=1, num_heads=2, num_classes=4,
                               class_dropout_prob=0.5, causal=kind == "autoregressive")
        objective = MaskedDiffusion(11) if kind == "masked" else AutoregressiveLM(11)
        x = torch.randint(0, 11, (8, 12))
    y = torch.randint(0, 4, (8,))
    embedders = [m for m in model.modules() if isinstance(m, LabelEmbedder)]
    model.train()

    def one_process() -> torch.Tensor:
        torch.manual_seed(7)
        return objective.loss(model, x, y, generator=torch.Generator().manual_seed(3))

    reference = one_process()
    # one rank of one: the same numbers, bit for bit
    torch.manual_seed(7)
    alone = sharded_loss(objective, model, x, y, torch.Generator().manual_seed(3), 0, 1, embedders)
    assert torch.equal(alone, reference)
    # two ranks, each with the same generator states and its half of the batch
    halves = []
    for rank in range(2):
        torch.manual_seed(7)
        rows = slice(4 * rank, 4 * rank + 4)
        halves.append(sharded_loss(objective, model, x[rows], y[rows], torch.Generator().manual_seed(3), rank, 2, embedders))
    torch.testing.assert_close(torch.cat(halves), reference, rtol=1e-5, atol=1e-6)
    assert all(e.training for e in embedders)  # the embedders' own dropout is switched back on
    if kind != "autoregressive":  # a control: drawing per rank (rank 1 as rank 0) gives other numbers
        torch.manual_seed(7)
        wrong = sharded_loss(objective, model, x[4:], y[4:], torch.Generator().manual_seed(3), 0, 2, embedders)
        assert not torch.allclose(wrong, reference[4:])


def test_sampler_shards_are_the_rows_of_the_global_batch_and_share_its_state():
    images = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)
    dataset = ImageDataset(images=images, labels=torch.arange(20) % 4, num_classes=4, class_names=list("abcd"), source="test")
    whole = EpochBatchSampler(dataset, 8, seed=1, hflip=True)
    ranks = [EpochBatchSampler(dataset, 8, seed=1, hflip=True, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):  # crosses an epoch (2 batches per epoch)
        x, y = whole.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert all(s.state_dict() == whole.state_dict() for s in ranks)
    with pytest.raises(DataError, match="divisible by 3"):
        EpochBatchSampler(dataset, 8, rank=0, world_size=3)
    # a sampler without its own sharding (text, latents) is cut by ShardedBatches the same way
    inner = EpochBatchSampler(dataset, 8, seed=1, hflip=True)
    wrapped = [ShardedBatches(EpochBatchSampler(dataset, 8, seed=1, hflip=True), r, 2) for r in range(2)]
    x, _ = inner.next_batch()
    assert torch.equal(torch.cat([w.next_batch()[0] for w in wrapped]), x)
    assert wrapped[1].state_dict() == inner.state_dict() and wrapped[1].epoch == inner.epoch


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(monkeypatch):
    cfg = _config(Path("unused"), "x")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="does not split over 3 processes x 2 accumulation steps: use a multiple of 6"):
        setup_distributed(cfg)
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not setup_distributed(cfg).active  # one process: nothing changes


def test_an_objective_without_global_draws_is_a_one_line_type_error():
    from ditkit.train.distributed import global_draws

    class Plain:
        pass

    with pytest.raises(TypeError, match=r"^Plain has no global_draws\(x, global_batch, rows, generator\): add it") as err:
        global_draws(Plain(), torch.zeros(2, 3), 4, slice(0, 2), torch.Generator())
    assert "\n" not in str(err.value)


def test_text_objectives_are_registered_and_built_from_the_config():
    from ditkit.builders import build_objective
    from ditkit.registry import OBJECTIVES

    cfg = get_recipe("text_sums")
    cfg.data.vocab_size = 11
    for kind, cls in (("masked", MaskedDiffusion), ("autoregressive", AutoregressiveLM)):
        entry = OBJECTIVES.get(kind)
        assert entry.obj is cls and entry.modality == "text" and entry.family == cls.family == kind
        cfg.objective.kind = kind
        objective = build_objective(cfg)
        assert isinstance(objective, cls) and objective.vocab_size == 11
    cfg.data.vocab_size = None
    with pytest.raises(ConfigError, match="data.vocab_size must be known"):
        build_objective(cfg)
