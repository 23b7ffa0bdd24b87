"""The training loop: one readable ``train(cfg)``.

Per optimiser step: ``grad_accum_steps`` micro-batches of forward (bf16 autocast where native) and
backward, gradient clipping, AdamW, EMA update. Every ``log_every`` steps the loss is read to the
host (the only sync), written to ``metrics.jsonl`` (and TensorBoard / W&B when enabled) and shown
on a tqdm bar (a terminal) or a log line (a pipe). Every ``sample_every`` steps the EMA model draws
a PNG grid; every ``ckpt_every`` steps and at the end a checkpoint is saved atomically. Every
``eval_every`` steps the EMA model is evaluated (a line in ``metrics.jsonl``); with ``keep_best`` an
improving evaluation also saves a checkpoint, spared by pruning and named in ``best.json``.

Exact resume: everything random comes from three sources, all saved in ``state.pt`` and restored:
the data order (a pure function of seed, epoch and position, see ``ditkit.data.sampler``), the
diffusion noise/time generator, and torch's global RNG (label dropout). The learning rate is a
pure function of the step. So N steps straight and k steps + resume + N - k steps give bitwise
identical weights.

Under torchrun the same function runs in every process; the few places that differ go through
``ctx`` (``ditkit.train.distributed.DistContext``: DDP / FSDP2, this rank's rows of the same random
streams, rank 0 writes). One process without torchrun takes the code paths above unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

import ditkit
from ditkit.config import Config, ConfigError, TrainConfig
from ditkit.data import EpochBatchSampler, ImageDataset, load_dataset
from ditkit.models.dit import count_params
from ditkit.sampling import (
    build_model,
    build_objective,
    display_scale,
    make_grid,
    model_kwargs,
    sample_images,
    save_png,
)
from ditkit.train.checkpoint import (
    CONFIG_FILE,
    atomic_write_bytes,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_config,
    load_training_state,
    load_weights,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from ditkit.train.distributed import NullLogger, is_sharded_checkpoint, load_training_checkpoint, setup_distributed
from ditkit.train.ema import EMA
from ditkit.train.precision import autocast, resolve_precision

__all__ = [
    "train", "preflight", "TrainResult", "NonFiniteLossError", "lr_at", "new_run_dir", "read_best", "RESUMABLE_SECTIONS",
    "BEST_METRICS", "BEST_FILE",
]

# Sections a resumed run may change; the others define the model and its data and must match.
RESUMABLE_SECTIONS = ("train", "run", "sample")
# What train.keep_best minimises: the first of these an evaluation reports (lower is better for both).
BEST_METRICS = ("val_bits_per_char", "fd_classifier")
BEST_FILE = "best.json"  # RUN/best.json: {"step", "metric", "value", "checkpoint"}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    """What ``train`` did: the run directory, steps done, newest checkpoint, whether Ctrl-C stopped
    it, the mean loss of the last logging window and the wall time."""

    run_dir: Path
    step: int  # optimiser steps done
    checkpoint: Optional[Path]  # the newest checkpoint written
    interrupted: bool  # stopped by Ctrl-C (a checkpoint was saved)
    loss: Optional[float]  # mean loss of the last logging window
    wall_time_s: float


COMPILE_AUTO_MIN_STEPS = 5_000


def compile_enabled(setting: bool | str, device: torch.device, steps_to_run: int) -> bool:
    """train.compile: true/false as given; "auto" compiles CUDA runs with at least
    COMPILE_AUTO_MIN_STEPS steps still to run. Measured (docs/benchmarks.md): DiT-XL/2 on an H200 steps
    1.46x (batch 32) to 1.49x (batch 256) faster after ~80 s of compilation, so it pays after about
    2,500 steps; on a 2-core CPU compiling gains 0-5% for ~50 s, so auto leaves the CPU eager."""
    if isinstance(setting, bool):
        return setting
    return device.type == "cuda" and steps_to_run >= COMPILE_AUTO_MIN_STEPS


def lr_at(step: int, t: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up over ``warmup_steps``, then
    constant or cosine decay to ``lr * min_lr_ratio`` at ``total_steps`` (Loshchilov & Hutter 2017)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def new_run_dir(cfg: Config) -> Path:
    """``results_dir/run_name``, or ``results_dir/NNN-<model>-<data>`` with the next free index
    (the official DiT naming)."""
    root = Path(cfg.run.results_dir)
    if cfg.run.run_name:
        return root / cfg.run.run_name
    data = cfg.data.dataset if "/" not in cfg.data.dataset and "\\" not in cfg.data.dataset else Path(cfg.data.dataset).stem
    taken = [int(p.name[:3]) for p in root.glob("[0-9][0-9][0-9]-*")] if root.is_dir() else []
    index = max(taken, default=-1) + 1
    return root / f"{index:03d}-{cfg.model.name.replace('/', '-')}-{Path(data).stem or 'data'}"


# ---- RNG state ---------------------------------------------------------------------------------


def _rng_state(noise: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"torch_cpu": torch.get_rng_state(), "noise": noise.get_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict[str, Any], noise: torch.Generator) -> None:
    """Put torch's global RNG (label dropout) and the noise generator back where they were."""
    torch.set_rng_state(state["torch_cpu"])
    noise.set_state(state["noise"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


# ---- Ctrl-C --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _graceful_interrupt(log: Callable[[str], None]) -> Iterator[dict[str, bool]]:
    """First Ctrl-C sets ``flag["stop"]`` (the loop saves a checkpoint after the current step and
    returns); a second one raises KeyboardInterrupt at once. Only in the main thread."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        log("Ctrl-C: saving a checkpoint after this step (press Ctrl-C again to abort without saving)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- logging -------------------------------------------------------------------------------------


class _Logger:
    """metrics.jsonl always; TensorBoard and W&B when enabled and installed; tqdm on a terminal."""

    def __init__(self, cfg: Config, run_dir: Path, start_step: int, total_steps: int, log: Callable[[str], None]):
        self.path = run_dir / "metrics.jsonl"
        self.log = log
        if self.path.exists():  # resumed: drop lines from steps after the checkpoint (and torn lines)
            kept = [ln for ln in self.path.read_text().splitlines() if _logged_step(ln) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.file = open(self.path, "a")
        self.tb = None
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                pass
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
                width = os.get_terminal_size(sys.stderr.fileno()).columns
            except OSError:
                width = 0
            # Some terminals (and ptys) report width 0: tqdm would draw nothing, so assume 100.
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                            dynamic_ncols=width > 0, ncols=None if width > 0 else 100)
        self.total_steps = total_steps

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

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
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", epoch=metrics["epoch"])
        else:
            left = (self.total_steps - step) / max(metrics["steps_per_sec"], 1e-9)
            self.log(
                f"step {step}/{self.total_steps} epoch {metrics['epoch']} loss {metrics['loss']:.4f} "
                f"lr {metrics['lr']:.2e} {metrics['steps_per_sec']:.2f} steps/s eta {_duration(left)}"
            )

    def write_eval(self, metrics: dict[str, Any]) -> None:
        """An evaluation line (``step``, ``fd_classifier``, ``precision``, ...) in metrics.jsonl, and
        the scalars under ``eval/`` in TensorBoard / W&B."""
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        step = metrics["step"]
        scalars = {k: v for k, v in metrics.items() if k not in ("step", "epoch") and isinstance(v, (int, float))}
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


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- the loop ------------------------------------------------------------------------------------


def _resolve_data(cfg: Config, dataset: ImageDataset) -> Config:
    """A copy of ``cfg`` with ``data.channels`` and ``data.num_classes`` set from the loaded data, so
    the saved config alone rebuilds the model."""
    resolved = Config.from_dict(cfg.to_dict())
    if cfg.modality == "text":  # a TextTrainingSet: the tokenizer decides the vocabulary
        resolved.data.vocab_size = dataset.tokenizer.vocab_size
    else:
        resolved.data.channels = dataset.channels
    resolved.data.num_classes = dataset.num_classes
    return resolved


def preflight(cfg: Config) -> None:
    """Every check that needs no data: config values, model preset, patch size vs image size.
    Raises ``ConfigError`` with the fix."""
    cfg.validate()
    probe = Config.from_dict(cfg.to_dict())
    probe.data.channels = probe.data.channels or 1  # placeholders: the data decides these later
    probe.data.num_classes = 0 if probe.data.num_classes is None else probe.data.num_classes
    if cfg.modality == "text":
        from ditkit.text_sampling import text_model_kwargs

        probe.data.vocab_size = probe.data.vocab_size or 2
        text_model_kwargs(probe)
        return
    model_kwargs(probe)


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


def _check_resume_config(cfg: Config, saved: Config, ckpt: Path) -> None:
    for section in ("model", "objective", "data"):
        ours, theirs = dataclasses.asdict(getattr(cfg, section)), dataclasses.asdict(getattr(saved, section))
        for key, value in ours.items():
            if section == "data" and key in ("channels", "num_classes", "vocab_size", "latent_channels", "vae_downsample") and value is None:
                continue  # not given: taken from the checkpoint
            if value != theirs.get(key):
                raise ConfigError(
                    f"cannot resume {ckpt} with {section}.{key}={value!r}: it was trained with {theirs.get(key)!r}. "
                    f"Only the {', '.join(RESUMABLE_SECTIONS)} sections may change on resume; start a new run instead"
                )


def train(
    cfg: Config,
    *,
    resume: Optional[str | Path] = None,
    stop_at_step: Optional[int] = None,
    on_step: Optional[Callable[[int], None]] = None,
    log: Callable[[str], None] = _stderr,
) -> TrainResult:
    """Train a DiT as configured and return where it went.

    Args:
        cfg: the full config (``cfg.validate()`` is called here too).
        resume: a run directory or checkpoint to continue from (its newest checkpoint for a run
            directory). The model, objective and data sections must match the checkpoint's.
        stop_at_step: save a checkpoint and return once this step is reached, as if interrupted
            (for time-sliced jobs; the learning-rate schedule still spans the whole run).
        on_step: called with the step number after every optimiser step.
        log: where progress lines go (stderr by default).

    Raises:
        ConfigError: bad values, found before any training step.
        NonFiniteLossError: the loss became NaN/inf; the newest checkpoint on disk is the last
            good one.
    """
    t0 = time.time()
    preflight(cfg)
    ctx = setup_distributed(cfg)  # torchrun: rank, device, process group (ditkit.train.distributed)
    if not ctx.is_main:
        log = lambda message: None  # noqa: E731  (rank 0 reports)
    ckpt_in: Optional[Path] = None
    if resume is not None:
        ckpt_in = resolve_checkpoint(resume)
        saved = load_checkpoint_config(ckpt_in)
        _check_resume_config(cfg, saved, ckpt_in)
        cfg = dataclasses.replace(cfg, data=saved.data)
        run_dir = ckpt_in.parent.parent
    else:
        run_dir = ctx.broadcast(new_run_dir(cfg))  # rank 0's choice on every rank
        if latest_checkpoint(run_dir) is not None:
            raise ConfigError(
                f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}, "
                "or pick another --run-name / --results-dir"
            )
    t = cfg.train
    device = ctx.device  # resolve_device(t.device); cuda:LOCAL_RANK under torchrun
    dtype = resolve_precision(t.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(t.seed)  # model init and label dropout; restored from the checkpoint on resume
    text = cfg.modality == "text"
    if text:  # packed int64 token chunks; a resumed run keeps its checkpoint's tokenizer
        from ditkit.data.text_loader import TextBatchSampler, load_text_data
        from ditkit.data.tokenizers import save_tokenizer
        from ditkit.text_sampling import load_checkpoint_tokenizer, write_training_samples

        dataset = load_text_data(cfg.data, load_checkpoint_tokenizer(ckpt_in) if ckpt_in is not None else None)
    else:
        dataset = load_dataset(cfg.data)
    cfg = _resolve_data(cfg, dataset)
    latent_cache = latent_vae = None
    if cfg.data.vae is not None:  # latent diffusion: train on cached VAE latents, sample through the decoder
        from ditkit.interop.training import prepare_latent_data

        with ctx.main_first():  # rank 0 builds the cache on disk, the other ranks then reuse it
            cfg, latent_cache, latent_vae = prepare_latent_data(cfg, dataset, device, log)
    model = build_model(cfg).to(device)
    if t.init_from is not None and ckpt_in is None:  # fine-tuning: pretrained weights, fresh optimiser
        from ditkit.interop.training import apply_init_from

        apply_init_from(model, cfg, run_dir, log, write_record=ctx.is_main)  # the same weights on every rank
    objective = build_objective(cfg)
    ema = EMA(model, t.ema_decay, t.ema_warmup)
    net = ctx.wrap(model, ema)  # what the loss calls: model (one process), DDP, or FSDP2 (shards model and EMA)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # biases, norms
    ]
    fused = device.type == "cuda" or tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=fused, foreach=None if fused else True)
    micro_batch = t.global_batch_size // t.grad_accum_steps
    if latent_cache is not None:
        from ditkit.data.latents import LatentBatchSampler

        sampler = LatentBatchSampler(latent_cache, micro_batch, seed=t.seed, hflip=cfg.data.hflip, device=device)
    else:
        sampler = (TextBatchSampler if text else EpochBatchSampler)(dataset, micro_batch, seed=t.seed, hflip=cfg.data.hflip, device=device)
    sampler = ctx.shard_sampler(sampler)  # several processes: this rank's rows of every global batch
    steps_per_epoch = max(1, len(dataset) // t.global_batch_size)
    total_steps = cfg.run_length(steps_per_epoch)
    noise = torch.Generator().manual_seed(t.seed + 1)  # diffusion times and noise (CPU: same on any device)

    step = 0
    if ckpt_in is not None:
        state = load_training_state(ckpt_in)
        if ctx.active or is_sharded_checkpoint(ckpt_in):  # DDP / FSDP2 layouts, or an FSDP run's shards
            load_training_checkpoint(ckpt_in, model, ema.model, optimizer, state)
        else:
            model.load_state_dict(load_weights(ckpt_in, "model"))
            ema.model.load_state_dict(load_weights(ckpt_in, "ema"))
            optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        sampler.load_state_dict(state["data"])
        _restore_rng_state(state["rng"], noise)
        step = int(state["step"])
        log(f"resumed {ckpt_in} at step {step} (epoch {sampler.epoch}, batch {sampler.position})")
        if step >= total_steps:
            log(f"nothing to do: step {step} >= run length {total_steps} (raise --max-steps or --epochs)")
    compiled = compile_enabled(t.compile, device, total_steps - step)  # "auto" weighs the steps left to run
    if compiled:
        net = torch.compile(net)  # same parameters: optimiser, EMA and checkpoints see the plain model
    if ctx.is_main:  # only rank 0 writes files
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / CONFIG_FILE, cfg.to_json().encode())
        if text:
            save_tokenizer(dataset.tokenizer, run_dir)
    what = dataset.describe() if text else (
        f"{dataset.source} ({len(dataset)} images {cfg.data.image_size}x{cfg.data.image_size}x{dataset.channels}, "
        f"{dataset.num_classes or 'no'} classes)"
    )
    log(
        f"run {run_dir}: {cfg.model.name} ({count_params(model) / 1e6:.2f}M params) on {what}, "
        f"{total_steps} steps of batch {t.global_batch_size}, "
        f"{device.type} {str(dtype).removeprefix('torch.')}{', torch.compile' if compiled else ''}{ctx.describe()}"
    )

    def training_state() -> dict[str, Any]:
        return {
            "step": step,
            "epoch": sampler.epoch,
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict(),
            "data": sampler.state_dict(),
            "rng": _rng_state(noise),
            "lr_schedule": {"kind": t.lr_schedule, "warmup_steps": t.warmup_steps, "total_steps": total_steps},
            "ditkit_version": ditkit.__version__,
        }

    last_ckpt: Optional[Path] = ckpt_in
    # train.keep_best: the best evaluation so far (RUN/best.json); a new best becomes "candidate"
    # until its checkpoint is on disk
    best = read_best(run_dir, step) if t.keep_best and ctx.is_main else None
    candidate: Optional[dict[str, Any]] = None

    def save() -> Path:
        nonlocal last_ckpt, best, candidate
        if ctx.active:  # rank 0 writes (FSDP: every rank its shards); all ranks wait until it is complete
            last_ckpt = ctx.save_checkpoint(run_dir, step, model, ema, optimizer, cfg, training_state)
        else:
            last_ckpt = save_checkpoint(run_dir, step, model.state_dict(), ema.model.state_dict(), cfg, training_state())
        if text and ctx.is_main:  # beside config.json (a copy in the run directory covers a crash before this line)
            save_tokenizer(dataset.tokenizer, last_ckpt)
        if candidate is not None and ctx.is_main:  # the checkpoint exists, then the record naming it
            best, candidate = {**candidate, "checkpoint": last_ckpt.name}, None
            atomic_write_bytes(run_dir / BEST_FILE, json.dumps(best).encode())
        if ctx.is_main:
            prune_checkpoints(run_dir, t.keep_last, keep=Path(best["checkpoint"]) if best else None)
        return last_ckpt

    # Device-side bookkeeping, read to the host only when logging or saving (no per-step sync).
    loss_sum = torch.zeros((), device=device)
    grad_norm_sum = torch.zeros((), device=device)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    window_steps, window_t0 = 0, time.time()
    last_loss: Optional[float] = None

    def check_finite() -> None:
        bad = ctx.first_bad_step(first_bad_step)  # the earliest over all ranks (a collective)
        if bad >= 0:
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
            raise NonFiniteLossError(
                f"loss became non-finite at step {bad}; {where}. Lower the learning rate (--lr), set "
                "train.grad_clip (e.g. --set train.grad_clip=1.0) or use --precision fp32"
            )

    evaluator = None
    if t.eval_every and ctx.is_main:  # built once: trains (or loads) the feature classifier and reference statistics
        if text:  # validation bits per character instead
            from ditkit.text_eval import TextPeriodicEvaluator as PeriodicEvaluator
        else:
            from ditkit.eval.model_eval import PeriodicEvaluator

        evaluator = PeriodicEvaluator(cfg, dataset, device=device, dtype=dtype, vae=latent_vae, log=log)
    logger = _Logger(cfg, run_dir, step, total_steps, log) if ctx.is_main else NullLogger()
    interrupted = False
    try:
        with _graceful_interrupt(log) as stop:
            model.train()
            first_step_start = time.perf_counter()
            while step < total_steps and (stop_at_step is None or step < stop_at_step):
                lr = lr_at(step, t, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss = torch.zeros((), device=device)
                for micro in range(t.grad_accum_steps):
                    x, y = sampler.next_batch()
                    with ctx.accumulate(net, last=micro == t.grad_accum_steps - 1):
                        with autocast(device, dtype):  # one process: objective.loss(model, x, y, generator=noise).mean()
                            loss = ctx.loss(objective, net, x, y, noise)
                        (loss / t.grad_accum_steps).backward()
                    step_loss += loss.detach().float() / t.grad_accum_steps
                max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")  # inf: measure, do not clip
                grad_norm = ctx.clip_grad_norm(params, max_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema.update(model)
                if compiled and first_step_start is not None:  # report the compilation time (one sync, once)
                    step_loss.item()  # wait for the device, so the time is the step's
                    log(f"torch.compile: first step {time.perf_counter() - first_step_start:.1f} s, compilation included")
                    first_step_start = None
                step += 1
                loss_sum += step_loss
                grad_norm_sum += grad_norm.float()
                first_bad_step = torch.where(
                    (first_bad_step < 0) & ~torch.isfinite(step_loss), torch.full_like(first_bad_step, step), first_bad_step
                )
                window_steps += 1
                logger.step()
                if on_step is not None:
                    on_step(step)

                done = step == total_steps
                if step % t.log_every == 0 or done:
                    ctx.sync_window(loss_sum, grad_norm_sum, stop["stop"])  # means over ranks; agree on Ctrl-C
                    check_finite()
                    elapsed = time.time() - window_t0
                    last_loss = loss_sum.item() / window_steps
                    logger.write({
                        "step": step, "epoch": sampler.epoch, "loss": last_loss, "lr": lr,
                        "grad_norm": grad_norm_sum.item() / window_steps,
                        "steps_per_sec": window_steps / elapsed,
                        "images_per_sec": window_steps * t.global_batch_size / elapsed,
                        "elapsed_s": time.time() - t0,
                    })
                    loss_sum.zero_(), grad_norm_sum.zero_()
                    window_steps, window_t0 = 0, time.time()
                if t.sample_every and (step % t.sample_every == 0 or done):
                    check_finite()
                    sample_t0 = time.time()
                    ema_model = ctx.full_model(ema.model)  # rank 0 (FSDP: gathered by all ranks); None elsewhere
                    if ema_model is not None and text:  # decoded text instead of a PNG grid
                        write_training_samples(ema_model, cfg, dataset.tokenizer, run_dir / "samples" / f"{step_dir_name(step)}.txt", device, dtype)
                    elif ema_model is not None:
                        _sample_grid(ema_model, cfg, run_dir / "samples" / f"{step_dir_name(step)}.png", device, dtype, vae=latent_vae)
                    window_t0 += time.time() - sample_t0  # steps/s measures training only
                evaluated = bool(t.eval_every) and (step % t.eval_every == 0 or done)
                if evaluated:
                    check_finite()
                    eval_t0 = time.time()  # EMA samples scored against the data; leaves the RNGs untouched
                    ema_model = ctx.full_model(ema.model)
                    if evaluator is not None and ema_model is not None:
                        metrics = evaluator(ema_model)
                        logger.write_eval({"step": step, "epoch": sampler.epoch, **metrics})
                        scored = _best_metric(metrics) if t.keep_best else None
                        if scored is not None and (best is None or scored[1] < best["value"]):
                            candidate = {"step": step, "metric": scored[0], "value": scored[1]}
                    window_t0 += time.time() - eval_t0
                # rank 0 evaluates; every rank takes part in a save (one broadcast per evaluation)
                improved = t.keep_best and evaluated and bool(ctx.broadcast(candidate is not None))
                stopping = ctx.stopping(stop["stop"]) or (stop_at_step is not None and step >= stop_at_step)
                if step % t.ckpt_every == 0 or done or stopping or improved:
                    check_finite()
                    save()
                if stopping:
                    interrupted = ctx.stopping(stop["stop"])
                    log(f"{'interrupted' if interrupted else 'stopped'} at step {step}; checkpoint {last_ckpt}. "
                        f"Continue with: ditkit train --resume {run_dir}")
                    break
            model.eval()
    finally:
        logger.close()
        ctx.close()
    return TrainResult(run_dir, step, last_ckpt, interrupted, last_loss, time.time() - t0)


@torch.no_grad()
def _sample_grid(
    model: torch.nn.Module, cfg: Config, path: Path, device: torch.device, dtype: torch.dtype, vae: Any = None
) -> None:
    """A grid of ``cfg.sample.num_samples`` EMA samples (labels cycling over the classes, fixed
    seeds, so grids of successive steps are comparable; latent runs decode through ``vae``).
    Leaves the training RNGs untouched."""
    n = cfg.sample.num_samples
    num_classes = cfg.data.num_classes or 0
    labels = [i % num_classes for i in range(n)] if num_classes else None
    seeds = [cfg.sample.seed + i for i in range(n)]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images, _, _ = sample_images(model, cfg, labels, seeds, device=device, dtype=dtype, vae=vae)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = num_classes if num_classes and num_classes <= 16 and n % num_classes == 0 else None
    save_png(make_grid(images, nrow=nrow, scale=display_scale(cfg.data.image_size)), path, {"step": path.stem, "model": cfg.model.name})
