"""The trainer's pieces (issue 13, point 4): the state object and its checkpoint round trip, a
user's own model and dataset, process-wide state restored, class names saved with the run, and
what the user sees (a missing TensorBoard, a finished run, the piped ETA, a 0x0 terminal)."""

import copy
import json
import os
import pty
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ditkit.train.loop as loop
from ditkit.config import Config
from ditkit.data import EpochBatchSampler, make_shapes
from ditkit.data.builtin import SHAPE_CLASSES
from ditkit.diffusion import FlowMatching
from ditkit.recipes import get_recipe
from ditkit.train.checkpoint import list_checkpoints
from ditkit.train.distributed import DistContext
from ditkit.train.ema import EMA
from ditkit.train.hooks import TENSORBOARD_MISSING, MetricsLogger
from ditkit.train.state import TrainState, build_optimizer, train_step

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, name, **train_kw):
    cfg = get_recipe("shapes_tiny")
    cfg.run.results_dir, cfg.run.run_name, cfg.run.tensorboard = str(tmp_path), name, False
    cfg.data.num_items = 40
    cfg.train.global_batch_size, cfg.train.max_steps, cfg.train.log_every, cfg.train.precision = 8, 2, 1, "fp32"
    for key, value in train_kw.items():
        setattr(cfg.train, key, value)
    return cfg


class TinyNet(nn.Module):
    """A user's own network: ``forward(x, t, y)`` -> same shape as ``x``, no ditkit layers."""

    def __init__(self, channels: int = 3, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.label = nn.Embedding(num_classes + 1, channels)
        self.time = nn.Linear(1, channels)

    def forward(self, x, t, y):
        cond = self.time(t.float()[:, None] / 1000)
        if y is not None:
            cond = cond + self.label(y)
        return self.conv(x) + cond[:, :, None, None]


@dataclass
class MyImages:
    """The minimal image dataset interface ``train`` documents."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: Optional[torch.Tensor]
    num_classes: int
    source: str = "my images"
    class_names: tuple = ("red", "green", "blue", "grey")

    def __len__(self):
        return len(self.images)


def _state(seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = TinyNet()
    data = make_shapes(40, 8)
    cfg = Config()
    cfg.train.lr = 1e-2
    return TrainState(model, EMA(model, 0.9), build_optimizer(model, cfg.train, torch.device("cpu")),
                      EpochBatchSampler(data, 8, seed=3, hflip=True), torch.Generator().manual_seed(seed + 1))


def _step(state: TrainState) -> torch.Tensor:
    loss, _ = train_step(state, FlowMatching(), state.model, DistContext(), lr=1e-2, grad_accum_steps=2, grad_clip=1.0,
                         device=torch.device("cpu"), dtype=torch.float32)
    return loss


def test_state_dict_round_trip_continues_exactly():
    a = _state(0)
    for _ in range(3):
        _step(a)
    saved = copy.deepcopy(a.state_dict())  # as written to state.pt: no tensor shared with `a`
    b = _state(1)  # other weights, RNGs and data position
    b.model.load_state_dict(a.model.state_dict())
    b.ema.model.load_state_dict(a.ema.model.state_dict())
    b.load_state_dict(saved)
    assert b.step == 3 and b.sampler.state_dict() == a.sampler.state_dict()
    torch.manual_seed(9)  # the global RNG (label dropout) is part of the state: load restores it
    b.load_state_dict(saved)
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch_cpu"])
    assert torch.equal(_step(a), _step(b))
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    # the control: without the state, the next step differs
    c = _state(1)
    c.model.load_state_dict(a.model.state_dict())
    assert not torch.equal(_step(c), _step(a))


def test_train_takes_a_users_own_model_and_dataset(tmp_path):
    data = make_shapes(40, 16)
    mine = MyImages(data.images, data.labels, data.num_classes)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(tmp_path, "own")
    cfg.objective.kind, cfg.objective.learn_sigma = "flow", False
    cfg.data.dataset = "my_images"  # a name only: the data comes from the object, not a path
    lines = []
    result = loop.train(cfg, model, mine, log=lines.append)
    assert result.step == 2 and any("your TinyNet" in line and "my images" in line for line in lines), lines
    saved = load_file(str(result.checkpoint / "model.safetensors"))
    assert saved.keys() == before.keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # the module the user passed
    assert not all(torch.equal(saved[k], before[k]) for k in before)  # and it was trained
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["data"]["class_names"] == list(mine.class_names) and config["data"]["num_classes"] == 4
    # the same module continues the run
    cfg.train.max_steps = 3
    assert loop.train(cfg, model, mine, resume=result.run_dir, log=lambda m: None).step == 3


def test_a_users_dataset_of_another_size_is_refused(tmp_path):
    data = make_shapes(40, 8)
    with pytest.raises(loop.ConfigError, match=r"images are 8x8 but data.image_size is 16: resize them or set --image-size 8"):
        loop.train(_cfg(tmp_path, "size"), TinyNet(), MyImages(data.images, data.labels, 4), log=lambda m: None)


def test_class_names_of_the_data_are_saved_with_the_run_and_resume_keeps_them(tmp_path):
    first = loop.train(_cfg(tmp_path, "names"), log=lambda m: None)
    saved = json.loads((first.run_dir / "config.json").read_text())["data"]
    assert saved["class_names"] == list(SHAPE_CLASSES)
    assert json.loads((first.checkpoint / "config.json").read_text())["data"]["class_names"] == list(SHAPE_CLASSES)
    assert loop.train(_cfg(tmp_path, "names", max_steps=3), resume=first.run_dir, log=lambda m: None).step == 3


def test_train_restores_the_global_rng_and_the_tf32_switches(tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    loop.train(_cfg(tmp_path, "rng"), log=lambda m: None)
    assert torch.equal(torch.get_rng_state(), before)
    # TF32 is switched on for CUDA runs only; the guard that restores it is the same for any device
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    with loop._process_state_restored():
        torch.backends.cuda.matmul.allow_tf32 = not flags[0]
        torch.backends.cudnn.allow_tf32 = not flags[1]
        torch.manual_seed(5)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == flags
    assert torch.equal(torch.get_rng_state(), before)


def test_a_missing_tensorboard_is_reported_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    cfg = _cfg(tmp_path, "tb")
    cfg.run.tensorboard = True
    lines = []
    loop.train(cfg, log=lines.append)
    assert lines.count(TENSORBOARD_MISSING) == 1
    assert (Path(tmp_path) / "tb" / "metrics.jsonl").is_file()


def test_a_resumed_run_that_is_finished_says_so_and_how_to_extend_it(tmp_path):
    first = loop.train(_cfg(tmp_path, "done"), log=lambda m: None)
    lines = []
    again = loop.train(_cfg(tmp_path, "done"), resume=first.run_dir, log=lines.append)
    assert again.stop_reason == "finished" and again.step == 2
    assert any("already finished: step 2 of 2" in line and "--max-steps 4" in line for line in lines), lines
    assert [c.name for c in list_checkpoints(first.run_dir)] == ["step_0000002"]


def test_the_piped_eta_follows_a_moving_average_of_steps_per_second(tmp_path):
    lines = []
    cfg = _cfg(tmp_path, "eta")
    (tmp_path / "eta").mkdir()
    logger = MetricsLogger(cfg, tmp_path / "eta", 0, 1000, lines.append)
    logger.bar = None  # the piped form, even when the tests run on a terminal
    for step, rate in ((100, 10.0), (200, 10.0), (300, 0.1)):  # one slow window on a busy machine
        logger.write({"step": step, "epoch": 0, "loss": 1.0, "lr": 1e-3, "steps_per_sec": rate})
    logger.close()
    assert lines[1].endswith("eta 1m20s")  # 800 steps at 10 steps/s
    # 700 steps at 0.7 * 10 + 0.3 * 0.1 = 7.03 steps/s: 99 s, not the 7,000 s the last window alone gives
    assert lines[2].endswith("eta 1m39s"), lines[2]


def test_a_terminal_that_reports_size_0x0_still_shows_the_bar(tmp_path):
    cfg = _cfg(tmp_path, "pty", max_steps=3)
    config = tmp_path / "cfg.json"
    config.write_text(cfg.to_json())
    code = ("import sys; from ditkit.config import Config; from ditkit.train.loop import train; "
            f"train(Config.from_json(open({str(config)!r}).read()), log=lambda m: None)")
    master, slave = pty.openpty()  # a new pty reports 0 columns x 0 rows
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the pty
                break
            if not chunk:
                break
            out += chunk
    finally:
        proc.wait(timeout=120)
        os.close(master)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    assert b"3/3" in out and b"step" in out, out
