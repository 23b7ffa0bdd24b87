"""What the training loop does between optimiser steps, one hook per concern.

After every step the loop calls ``hook.after_step(state, run)`` on, in this order:

* ``LogHook``: every ``log_every`` steps the window's mean loss and gradient norm are read to the
  host (the only sync), checked for NaN/inf, written to ``metrics.jsonl`` (TensorBoard / W&B when
  enabled) and shown on a tqdm bar (terminal) or a log line (pipe) by ``MetricsLogger``;
* ``SampleGridHook``: every ``sample_every`` steps the EMA model writes a sample grid (PNG, or a
  .txt for text) through ``ditkit.pipelines.write_training_samples``;
* ``EvalHook``: every ``eval_every`` steps the EMA model is evaluated (a line in metrics.jsonl); with
  ``keep_best`` an improvement marks the step for a checkpoint;
* ``StopHook``: Ctrl-C, ``stop_at_step`` or a spent ``train.time_budget`` ends the run;
* ``CheckpointHook``: every ``ckpt_every`` steps, at the end, at a stop and at a new best, a
  checkpoint is saved atomically (``best.json`` names the best one; old ones are pruned).

``Run`` is what the hooks share: the config, where the run is, the ``DistContext``, the training
clock and the device-side window of losses. Sample grids and evaluation pause the clock, so
``steps_per_sec`` and the time budget count training only.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ditkit.config import Config
from ditkit.errors import ConfigError
from ditkit.adapters import adapters_of, save_adapter
from ditkit.checkpoint_io import ADAPTER_DIR, EMA_ADAPTER_DIR
from ditkit.fileio import write_text
from ditkit.train.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    atomic_write_bytes,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
    staging_dir,
    step_dir_name,
)
from ditkit.train.state import TrainingClock, TrainState, lr_at

__all__ = [
    "Run", "Hook", "LogHook", "SampleGridHook", "EvalHook", "StopHook", "UnmaskHook", "CheckpointHook", "MetricsLogger",
    "NonFiniteLossError", "save_adapter_checkpoint", "parse_duration", "duration_flag", "format_duration", "read_best", "BEST_METRICS", "BEST_FILE",
]

# What train.keep_best minimises: the first of these an evaluation reports (lower is better for both).
BEST_METRICS = ("val_bits_per_char", "fd_classifier")
BEST_FILE = "best.json"  # RUN/best.json: {"step", "metric", "value", "checkpoint"}
TENSORBOARD_MISSING = "tensorboard not installed: pip install tensorboard; metrics.jsonl is written anyway"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


# ---- durations ---------------------------------------------------------------------------------

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, name: str = "--time-budget") -> float:
    """``"90s"``, ``"10m"``, ``"1.5h"`` (or a bare number of seconds) -> seconds (> 0). Raises a
    one-line ``ConfigError`` naming ``name`` and the accepted forms."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(text).lower())
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"] if match else 0.0
    if not seconds > 0 or not math.isfinite(seconds):
        raise ConfigError(f"{name} {text!r}: give a positive duration such as 90s, 10m or 1.5h")
    return seconds


def duration_flag(seconds: float) -> str:
    """Seconds as a value ``parse_duration`` reads back exactly, in the largest unit that divides
    it: ``16`` -> ``"16s"``, ``1200`` -> ``"20m"``, ``7200`` -> ``"2h"`` (fractions round up)."""
    whole = math.ceil(seconds)
    for unit in ("h", "m"):
        if whole % _UNITS[unit] == 0:
            return f"{whole // int(_UNITS[unit])}{unit}"
    return f"{whole}s"


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``75`` -> ``"1m15s"``."""
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ---- keep-best record ----------------------------------------------------------------------------


def read_best(run_dir: str | Path, max_step: Optional[int] = None) -> Optional[dict[str, Any]]:
    """The best evaluation a ``train.keep_best`` run recorded (``RUN/best.json``: ``step``, ``metric``,
    ``value``, ``checkpoint`` directory name), or None. ``max_step``: ignore a record from a later
    step (a run resumed from an earlier checkpoint starts its search again)."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    best = json.loads(path.read_text())
    if max_step is not None and best["step"] > max_step:
        return None
    # a run resumed with keep_best off prunes the best checkpoint: the record then names nothing
    return best if any(ckpt.name == best["checkpoint"] for ckpt in list_checkpoints(run_dir)) else None


def _best_metric(metrics: dict[str, Any]) -> Optional[tuple[str, float]]:
    """``(name, value)`` of the first ``BEST_METRICS`` entry an evaluation reported, or None."""
    for name in BEST_METRICS:
        if isinstance(metrics.get(name), (int, float)) and math.isfinite(metrics[name]):
            return name, float(metrics[name])
    return None


# ---- what the hooks share --------------------------------------------------------------------------


@dataclass
class Run:
    """The facts and bookkeeping the hooks share for one training session.

    ``total_steps``: the run length (None: only the time budget ends it); ``budget_s``: the time
    budget in training seconds (None: off); ``interrupt["stop"]`` is set by Ctrl-C;
    ``stop_reason`` is set by ``StopHook`` ("interrupt", "stop_at_step", "budget");
    ``improved`` by ``EvalHook`` when keep-best found a new best this step.
    """

    cfg: Config
    run_dir: Path
    ctx: Any  # ditkit.train.distributed.DistContext
    device: torch.device
    dtype: torch.dtype
    total_steps: Optional[int]
    log: Callable[[str], None]
    clock: TrainingClock
    budget_s: Optional[float] = None
    interrupt: dict[str, bool] = field(default_factory=lambda: {"stop": False})
    last_ckpt: Optional[Path] = None
    stop_reason: Optional[str] = None
    improved: bool = False
    best: Optional[dict[str, Any]] = None  # keep-best: the best evaluation on disk
    candidate: Optional[dict[str, Any]] = None  # keep-best: a new best until its checkpoint is saved
    last_loss: Optional[float] = None
    lr_of_step: float = 0.0  # the learning rate of the step just taken (logged)
    started: float = field(default_factory=time.time)  # wall time of the session's start (logged elapsed_s)

    def __post_init__(self) -> None:
        # Device-side bookkeeping, read to the host only when logging or saving (no per-step sync).
        self.loss_sum = torch.zeros((), device=self.device)
        self.grad_norm_sum = torch.zeros((), device=self.device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.window_steps, self.window_t0 = 0, time.time()

    def lr(self, state: TrainState) -> float:
        return lr_at(state.step, self.cfg.train, self.total_steps, elapsed_s=state.elapsed_s, budget_s=self.budget_s)

    def progress(self, state: TrainState) -> Optional[float]:
        """The share of the run done before the next step: training seconds over the time budget,
        else steps over the run length; None when neither bounds the run (``--epochs`` counts steps)."""
        if self.budget_s:
            return min(1.0, state.elapsed_s / self.budget_s)
        if self.total_steps:
            return min(1.0, state.step / self.total_steps)
        return None

    def done(self, state: TrainState) -> bool:
        """The run length is reached."""
        return self.total_steps is not None and state.step >= self.total_steps

    def due(self, state: TrainState, every: int) -> bool:
        """``every`` is on (> 0) and this step is one of its multiples or the last one."""
        return bool(every) and (state.step % every == 0 or self.done(state))

    def record(self, state: TrainState, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Add a finished step to the window; update the training seconds (one process: every
        step; several: rank 0's clock at logging steps, so all ranks share one schedule)."""
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm
        self.first_bad_step = torch.where(
            (self.first_bad_step < 0) & ~torch.isfinite(loss), torch.full_like(self.first_bad_step, state.step), self.first_bad_step
        )
        self.window_steps += 1
        if not self.ctx.active or self.due(state, self.cfg.train.log_every):
            state.elapsed_s = self.ctx.agree(self.clock.elapsed())

    def check_finite(self) -> None:
        """Raise ``NonFiniteLossError`` if any step so far (on any rank) had a NaN/inf loss."""
        bad = self.ctx.first_bad_step(self.first_bad_step)  # the earliest over all ranks (a collective)
        if bad >= 0:
            where = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was saved yet"
            raise NonFiniteLossError(
                f"loss became non-finite at step {bad}; {where}. Lower the learning rate (--lr), set "
                "train.grad_clip (e.g. --set train.grad_clip=1.0) or use --precision fp32"
            )

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside counts neither as training seconds nor in ``steps_per_sec``."""
        t0 = time.time()
        with self.clock.pause():
            yield
        self.window_t0 += time.time() - t0


class Hook:
    """Something done between steps: ``after_step`` runs after every optimiser step."""

    def after_step(self, state: TrainState, run: Run) -> None:
        pass

    def close(self) -> None:
        pass


# ---- logging -------------------------------------------------------------------------------------


class MetricsLogger:
    """metrics.jsonl always; TensorBoard and W&B when enabled (W&B asked for but missing: a
    ``ConfigError``; TensorBoard missing: one notice, as it is on by default); tqdm on a terminal,
    else a line per logging step whose ETA comes from an exponential moving average of steps/s."""

    ETA_SMOOTHING = 0.3  # weight of the newest window in the steps/s average

    def __init__(
        self, cfg: Config, run_dir: Path, start_step: int, total_steps: Optional[int], log: Callable[[str], None],
        budget_s: Optional[float] = None,
    ):
        self.path = run_dir / "metrics.jsonl"
        self.log = log
        self.total_steps, self.budget_s, self.rate = total_steps, budget_s, None
        if self.path.exists():  # resumed: drop lines from steps after the checkpoint (and torn lines)
            kept = [ln for ln in self.path.read_text().splitlines() if _logged_step(ln) <= start_step]
            write_text(self.path, "".join(ln + "\n" for ln in kept))
        self.file = open(self.path, "a")
        self.tb = None
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log(TENSORBOARD_MISSING)
            else:
                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.wandb = None
        if cfg.run.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("run.wandb=true but wandb is not installed: pip install wandb, or drop run.wandb") from None
            self.wandb = wandb.init(
                project="ditkit", name=run_dir.name, id=run_dir.name.replace("/", "-"), resume="allow",
                dir=str(run_dir), mode=cfg.run.wandb_mode, config=cfg.to_dict(),
            )
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            try:
                size = os.get_terminal_size(sys.stderr.fileno())
            except OSError:
                size = os.terminal_size((0, 0))
            # Some terminals (and fresh ptys) report 0x0: tqdm would then draw nothing (it takes
            # 0 rows as "no room"), so give it a size of its own.
            sized = size.columns > 0 and size.lines > 0
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def eta(self, step: int, steps_per_sec: float, train_s: Optional[float] = None) -> float:
        """Seconds left: steps left over the smoothed steps/s, capped by the time budget left."""
        self.rate = steps_per_sec if self.rate is None else (
            (1 - self.ETA_SMOOTHING) * self.rate + self.ETA_SMOOTHING * steps_per_sec
        )
        left = math.inf if self.total_steps is None else (self.total_steps - step) / max(self.rate, 1e-9)
        if self.budget_s is not None and train_s is not None:
            left = min(left, max(0.0, self.budget_s - train_s))
        return left

    def write(self, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        step = metrics["step"]
        scalars = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        left = self.eta(step, metrics["steps_per_sec"], metrics.get("train_s"))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", epoch=metrics["epoch"])
        else:
            of = f"/{self.total_steps}" if self.total_steps is not None else ""
            self.log(
                f"step {step}{of} epoch {metrics['epoch']} loss {metrics['loss']:.4f} "
                f"lr {metrics['lr']:.2e} {metrics['steps_per_sec']:.2f} steps/s eta {format_duration(left) if math.isfinite(left) else '?'}"
            )

    def write_eval(self, metrics: dict[str, Any]) -> None:
        """An evaluation line (``step``, ``fd_classifier``, ``precision``, ...) in metrics.jsonl, and
        the scalars under ``eval/`` in TensorBoard / W&B."""
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        step = metrics["step"]
        scalars = {k: v for k, v in metrics.items() if k not in ("step", "epoch", "train_s") and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"eval/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in scalars.items()}, step=step)
        shown = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        if self.bar is not None:
            self.bar.write(f"eval at step {step}: {shown}", file=sys.stderr)
        else:
            self.log(f"eval at step {step}: {shown}")

    def write_samples(self, path: Path, step: int) -> None:
        """A training sample file into TensorBoard under ``samples/``: a PNG grid or strip as an
        image, a ``.txt`` as text, and the clips ``STEM_N.wav`` beside it as audio (audio runs)."""
        if self.tb is None:
            return
        if path.suffix == ".png":
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
            self.tb.add_image("samples/grid", pixels, step, dataformats="HWC")
        elif path.suffix == ".txt":
            self.tb.add_text("samples/text", "    " + path.read_text().replace("\n", "\n    "), step)  # code block: keeps spacing
        for wav in sorted(path.parent.glob(f"{path.stem}_*.wav")):
            import soundfile

            wave, rate = soundfile.read(str(wav), dtype="float32", always_2d=True)  # (samples, channels)
            self.tb.add_audio(f"samples/{wav.stem[len(path.stem) + 1:]}", wave.mean(1), step, sample_rate=rate)

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for an unreadable line (dropped on resume)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


# ---- the hooks -----------------------------------------------------------------------------------


class LogHook(Hook):
    """Every ``log_every`` steps (and the last): means over the window (and the ranks), a
    non-finite check, one metrics line."""

    def __init__(self, logger: Any, every: int) -> None:
        self.logger, self.every = logger, every

    def after_step(self, state: TrainState, run: Run) -> None:
        self.logger.step()
        if not run.due(state, self.every):
            return
        run.ctx.sync_window(run.loss_sum, run.grad_norm_sum, run.interrupt["stop"])  # means over ranks; agree on Ctrl-C
        run.check_finite()
        elapsed = time.time() - run.window_t0
        run.last_loss = run.loss_sum.item() / run.window_steps
        t = run.cfg.train
        self.logger.write({
            "step": state.step, "epoch": state.sampler.epoch, "loss": run.last_loss, "lr": run.lr_of_step,
            "grad_norm": run.grad_norm_sum.item() / run.window_steps,
            "steps_per_sec": run.window_steps / elapsed,
            "images_per_sec": run.window_steps * t.global_batch_size / elapsed,
            "elapsed_s": time.time() - run.started, "train_s": state.elapsed_s,
        })
        run.loss_sum.zero_(), run.grad_norm_sum.zero_()
        run.window_steps, run.window_t0 = 0, time.time()

    def close(self) -> None:
        self.logger.close()


class SampleGridHook(Hook):
    """Every ``sample_every`` steps: the EMA model's samples (fixed labels and seeds, so grids of
    successive steps compare) at ``RUN/samples/step_NNNNNNN.png`` (text: ``.txt``; audio: the
    spectrogram strip and ``_N.wav`` clips), also sent to TensorBoard when it is on."""

    def __init__(self, every: int, *, vae: Any = None, tokenizer: Any = None, logger: Any = None) -> None:
        self.every, self.vae, self.tokenizer, self.logger = every, vae, tokenizer, logger

    def after_step(self, state: TrainState, run: Run) -> None:
        if not run.due(state, self.every):
            return
        run.check_finite()
        with run.paused():
            ema_model = run.ctx.full_model(state.ema.model)  # rank 0 (FSDP: gathered by all ranks); None elsewhere
            if ema_model is not None:
                from ditkit.pipelines import write_training_samples  # pipelines import the model rooms: lazily

                path = write_training_samples(ema_model, run.cfg, run.run_dir / "samples" / step_dir_name(state.step),
                                              device=run.device, dtype=run.dtype, vae=self.vae, tokenizer=self.tokenizer)
                if self.logger is not None:
                    self.logger.write_samples(path, state.step)


class EvalHook(Hook):
    """Every ``eval_every`` steps: ``evaluator(ema_model) -> metrics`` on rank 0, logged; with
    ``keep_best`` a lower ``BEST_METRICS`` value than the best so far becomes ``run.candidate`` and
    sets ``run.improved`` (agreed by all ranks), so ``CheckpointHook`` saves this step."""

    def __init__(self, every: int, evaluator: Any, logger: Any, keep_best: bool) -> None:
        self.every, self.evaluator, self.logger, self.keep_best = every, evaluator, logger, keep_best

    def after_step(self, state: TrainState, run: Run) -> None:
        run.improved = False
        if not run.due(state, self.every):
            return
        run.check_finite()
        with run.paused():  # EMA samples scored against the data; leaves the RNGs untouched
            ema_model = run.ctx.full_model(state.ema.model)
            if self.evaluator is not None and ema_model is not None:
                metrics = self.evaluator(ema_model)
                self.logger.write_eval({"step": state.step, "epoch": state.sampler.epoch, "train_s": state.elapsed_s, **metrics})
                scored = _best_metric(metrics) if self.keep_best else None
                if scored is not None and (run.best is None or scored[1] < run.best["value"]):
                    run.candidate = {"step": state.step, "metric": scored[0], "value": scored[1]}
        # rank 0 evaluates; every rank takes part in the save (one broadcast per evaluation)
        run.improved = self.keep_best and bool(run.ctx.broadcast(run.candidate is not None))


class UnmaskHook(Hook):
    """MaskDiT's unmasking phase: once ``fraction`` of the run is left (``Run.progress``), train
    without token masking (``objective.set_mask_ratio(0)``; ``diffusion/masking.py``). Checked at
    creation too, so a run resumed inside the phase starts unmasked."""

    def __init__(self, objective: Any, fraction: float, state: TrainState, run: Run) -> None:
        self.objective, self.fraction = objective, fraction
        self.after_step(state, run)

    def after_step(self, state: TrainState, run: Run) -> None:
        progress = run.progress(state)
        if self.objective.mask_ratio and progress is not None and progress >= 1.0 - self.fraction:
            self.objective.set_mask_ratio(0.0)
            run.log(f"step {state.step}: unmasking phase (the last {self.fraction:.0%} of the run trains every token)")


class StopHook(Hook):
    """Ends the run early: Ctrl-C (agreed by all ranks), ``stop_at_step``, or a spent time budget
    (``run.budget_s`` training seconds)."""

    def __init__(self, stop_at_step: Optional[int]) -> None:
        self.stop_at_step = stop_at_step

    def after_step(self, state: TrainState, run: Run) -> None:
        if run.ctx.stopping(run.interrupt["stop"]):
            run.stop_reason = "interrupt"
        elif self.stop_at_step is not None and state.step >= self.stop_at_step:
            run.stop_reason = "stop_at_step"
        elif run.budget_s is not None and state.elapsed_s >= run.budget_s and not run.done(state):
            run.stop_reason = "budget"


class CheckpointHook(Hook):
    """Saves a checkpoint every ``ckpt_every`` steps, at the end, at a stop and at a new best:
    ``save(state) -> Path`` writes it (every rank takes part); then ``best.json`` and pruning."""

    def __init__(self, every: int, save: Callable[[TrainState], Path], keep_last: int) -> None:
        self.every, self.save, self.keep_last = every, save, keep_last

    def after_step(self, state: TrainState, run: Run) -> None:
        if state.step % self.every == 0 or run.done(state) or run.stop_reason is not None or run.improved:
            run.check_finite()
            self.save_now(state, run)

    def save_now(self, state: TrainState, run: Run) -> Path:
        with run.paused():  # writing files is not training: it does not spend the time budget
            run.last_ckpt = self.save(state)
        if run.ctx.is_main:
            if run.candidate is not None:  # the checkpoint exists, then the record naming it
                run.best, run.candidate = {**run.candidate, "checkpoint": run.last_ckpt.name}, None
                atomic_write_bytes(run.run_dir / BEST_FILE, json.dumps(run.best).encode())
            prune_checkpoints(run.run_dir, self.keep_last, keep=Path(run.best["checkpoint"]) if run.best else None)
        return run.last_ckpt


def save_adapter_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, ema_model: torch.nn.Module, cfg: Config, training_state: dict[str, Any],
    model_state: Optional[dict[str, torch.Tensor]] = None, ema_state: Optional[dict[str, torch.Tensor]] = None,
    extra_files: Optional[dict[str, bytes]] = None,
) -> Path:
    """A LoRA run's ``RUN/checkpoints/step_N``: ``adapter/`` and ``ema_adapter/`` (``save_adapter``:
    the adapter tensors only, a few percent of the model), ``config.json`` and ``state.pt``, staged
    and published by one atomic rename as ``save_checkpoint`` does (the base is ``train.init_from``).
    ``model_state`` / ``ema_state``: full state dicts to take the adapter tensors from (FSDP2: the
    gathered weights; default: the modules' own ``state_dict()``); ``extra_files`` as ``save_checkpoint``."""
    root = Path(run_dir) / "checkpoints"
    staged = staging_dir(run_dir, step)
    try:
        save_adapter(model, staged / ADAPTER_DIR, state_dict=model_state)
        save_adapter(ema_model, staged / EMA_ADAPTER_DIR, state_dict=ema_state)
        atomic_write_bytes(staged / CONFIG_FILE, cfg.to_json().encode())
        buffer = io.BytesIO()
        torch.save(training_state, buffer)
        atomic_write_bytes(staged / STATE_FILE, buffer.getvalue())
        for name, data in (extra_files or {}).items():
            atomic_write_bytes(staged / name, data)
        final = root / step_dir_name(step)
        if final.exists():  # re-saving a step (rare): the old copy goes first
            shutil.rmtree(final)
        os.rename(staged, final)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return final


def checkpoint_saver(run: Run, state_extra: Callable[[], dict[str, Any]], tokenizer: Any = None) -> Callable[[TrainState], Path]:
    """``save(state) -> Path``: the weights and ``state.state_dict()`` at ``RUN/checkpoints/step_N``
    (several processes: through the ``DistContext``), plus the tokenizer of a text or prompt run,
    published with them (a checkpoint folder never lacks its tokenizer)."""
    extra = None
    if tokenizer is not None:
        from ditkit.data.tokenizers import TOKENIZER_FILE, tokenizer_json

        extra = {TOKENIZER_FILE: tokenizer_json(tokenizer)}

    def save(state: TrainState) -> Path:
        def training_state() -> dict[str, Any]:
            return {**state.state_dict(), **state_extra()}

        if adapters_of(state.model):  # a LoRA run: adapter/ and ema_adapter/ instead of the model files
            ckpt = run.run_dir / "checkpoints" / step_dir_name(state.step)
            # FSDP2: every rank takes part in gathering the weights and optimiser; rank 0 then
            # writes the one-process layout, which resumes on any number of processes.
            gathered = run.ctx.gather_adapter_state(state.model, state.ema.model, state.optimizer) if run.ctx.fsdp else None
            if run.ctx.is_main:
                saved, model_state, ema_state = training_state(), None, None
                if gathered is not None:
                    model_state, ema_state, saved["optimizer"] = gathered
                ckpt = save_adapter_checkpoint(run.run_dir, state.step, state.model, state.ema.model, run.cfg, saved,
                                               model_state, ema_state, extra_files=extra)
            if run.ctx.active:
                run.ctx.barrier()  # every rank returns once the checkpoint is complete
        elif run.ctx.active:  # rank 0 writes (FSDP: every rank its shards); all ranks wait until it is complete
            ckpt = run.ctx.save_checkpoint(run.run_dir, state.step, state.model, state.ema, state.optimizer, run.cfg,
                                           training_state, extra_files=extra)
        else:
            ckpt = save_checkpoint(run.run_dir, state.step, state.model.state_dict(), state.ema.model.state_dict(), run.cfg,
                                   training_state(), extra_files=extra)
        return ckpt

    return save
