"""The training loop: ``train(cfg, model=None, dataset=None)``.

The pieces live beside it: ``ditkit.train.state`` (``TrainState``: model, EMA, optimiser, data
position, RNGs, step, training seconds; ``train_step``; the learning-rate schedule ``lr_at``) and
``ditkit.train.hooks`` (logging, sample grids, evaluation and keep-best, stopping, checkpoints).
``train`` builds them from the config, then runs::

    while not run.done(state):
        loss, grad_norm = train_step(state, ...)
        for hook in hooks: hook.after_step(state, run)

Exact resume: everything random comes from three sources, all saved in ``state.pt`` and restored:
the data order (a pure function of seed, epoch and position, see ``ditkit.data.sampler``), the
diffusion noise/time generator, and torch's global RNG (label dropout). The learning rate is a
pure function of the step (with ``train.time_budget``, of the training seconds, also saved). So N
steps straight and k steps + resume + N - k steps give bitwise identical weights.

LoRA (``train.lora_rank > 0``, docs/lora.md): the ``--init-from`` base is frozen and peft adapters
are injected before the EMA is built (``ditkit.adapters.apply_lora``), so the optimiser, clipping and
EMA see only adapter weights as trainable; checkpoints hold ``adapter/`` and ``ema_adapter/`` instead
of the model files, and a resumed run loads its base from ``--init-from`` again.

``train`` leaves the process as it found it: torch's global RNG and the TF32 switches it sets on
CUDA are restored when it returns (or raises).

Under torchrun the same function runs in every process; the few places that differ go through
``ctx`` (``ditkit.train.distributed.DistContext``: DDP / FSDP2, this rank's rows of the same random
streams, rank 0 writes). One process without torchrun takes the code paths above unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ditkit.builders import build_model, check_model_config, training_objective
from ditkit.config import Config, ConfigError, DataConfig
from ditkit.data import EpochBatchSampler, is_caption_data, load_dataset
from ditkit.train.checkpoint import (
    CONFIG_FILE,
    atomic_write_bytes,
    latest_checkpoint,
    load_checkpoint_config,
    resolve_checkpoint,
)
from ditkit.train.distributed import NullLogger, is_sharded_checkpoint, setup_distributed
from ditkit.train.ema import EMA
from ditkit.train.hooks import (
    BEST_FILE,
    BEST_METRICS,
    CheckpointHook,
    EvalHook,
    Hook,
    LogHook,
    MetricsLogger,
    NonFiniteLossError,
    Run,
    SampleGridHook,
    StopHook,
    UnmaskHook,
    checkpoint_saver,
    duration_flag,
    format_duration,
    parse_duration,
    read_best,
)
from ditkit.train.precision import resolve_precision
from ditkit.train.state import TrainingClock, TrainState, build_optimizer, lr_at, train_step


__all__ = [
    "train", "preflight", "TrainResult", "NonFiniteLossError", "lr_at", "new_run_dir", "read_best", "RESUMABLE_SECTIONS",
    "BEST_METRICS", "BEST_FILE", "compile_enabled", "COMPILE_AUTO_MIN_STEPS",
]

# Sections a resumed run may change; the others define the model and its data and must match.
RESUMABLE_SECTIONS = ("train", "run", "sample")
# data fields training fills in from the data: not given (None) means "take the checkpoint's"
_DATA_FROM_TRAINING = ("channels", "num_classes", "vocab_size", "latent_channels", "vae_downsample", "class_names",
                       "text_encoder_sha256", "text_encoder_dim", "caption_vocab_size")
# data fields a prompt fine-tune takes from its --init-from source's caption tokenizer
_DATA_FROM_INIT_SOURCE = ("caption_tokenizer", "max_caption_length")
COMPILE_AUTO_MIN_STEPS = 5_000


@dataclass
class TrainResult:
    """What ``train`` did: the run directory, steps done, newest checkpoint, whether Ctrl-C stopped
    it, the mean loss of the last logging window and the wall time. ``stop_reason``: None (the run
    length was reached), "interrupt", "stop_at_step", "budget" (``train.time_budget`` spent) or
    "finished" (a resumed run that had nothing left to do); ``train_s``: training seconds of the
    whole run (all sessions), what the time budget counts."""

    run_dir: Path
    step: int  # optimiser steps done
    checkpoint: Optional[Path]  # the newest checkpoint written
    interrupted: bool  # stopped by Ctrl-C (a checkpoint was saved)
    loss: Optional[float]  # mean loss of the last logging window
    wall_time_s: float
    stop_reason: Optional[str] = None
    train_s: float = 0.0
    steps_this_session: int = 0


def compile_enabled(setting: bool | str, device: torch.device, steps_to_run: Optional[int]) -> bool:
    """train.compile: true/false as given; "auto" compiles CUDA runs with at least
    COMPILE_AUTO_MIN_STEPS steps still to run (a time-budget run without a step count: CUDA).
    Measured (docs/benchmarks.md): DiT-XL/2 on an H200 steps 1.46x (batch 32) to 1.49x (batch 256)
    faster after ~80 s of compilation, so it pays after about 2,500 steps; on a 2-core CPU compiling
    gains 0-5% for ~50 s, so auto leaves the CPU eager."""
    if isinstance(setting, bool):
        return setting
    return device.type == "cuda" and (steps_to_run is None or steps_to_run >= COMPILE_AUTO_MIN_STEPS)


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


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- process-wide state ----------------------------------------------------------------------------


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    """Put back what training changes for the whole process: torch's global RNG (CPU and CUDA) and
    the TF32 matmul / cuDNN switches."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32[0], tf32[1]
        torch.set_float32_matmul_precision(tf32[2])


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


# ---- checks before any work --------------------------------------------------------------------------


def preflight(cfg: Config, *, check_model: bool = True, check_data: bool = True) -> None:
    """Every check that needs no data: config values, the time budget, model preset, patch size vs
    image size (``check_model=False`` when the caller brings its own model, ``check_data=False``
    its own dataset). Raises ``ConfigError`` with the fix."""
    cfg.validate(check_data=check_data)
    if cfg.train.time_budget is not None:
        parse_duration(cfg.train.time_budget)
    if not 0.0 < cfg.train.decay_fraction <= 1.0:
        raise ConfigError(f"train.decay_fraction={cfg.train.decay_fraction}: use a fraction in (0, 1], e.g. 0.2")
    if check_model:
        check_model_config(cfg)  # placeholders for the sizes the data decides later


def _check_resume_config(cfg: Config, saved: Config, ckpt: Path) -> None:
    defaults = dataclasses.asdict(DataConfig())
    for section in ("model", "objective", "data"):
        ours, theirs = dataclasses.asdict(getattr(cfg, section)), dataclasses.asdict(getattr(saved, section))
        for key, value in ours.items():
            if section == "data" and key in _DATA_FROM_TRAINING and value is None:
                continue  # not given: taken from the checkpoint
            if section == "data" and key in _DATA_FROM_INIT_SOURCE and saved.train.init_from and value == defaults[key]:
                continue  # a fine-tune took these from its source's tokenizer (_init_source_caption_fields)
            if value != theirs.get(key):
                raise ConfigError(
                    f"cannot resume {ckpt} with {section}.{key}={value!r}: it was trained with {theirs.get(key)!r}. "
                    f"Only the {', '.join(RESUMABLE_SECTIONS)} sections may change on resume; start a new run instead"
                )


# ---- data --------------------------------------------------------------------------------------------


def _load_data(cfg: Config, ckpt_in: Optional[Path]) -> Any:
    """The configured dataset: an ``ImageDataset`` or, for text, a ``TextTrainingSet`` (a resumed
    run keeps its checkpoint's tokenizer, a prompt model's caption tokenizer too)."""
    from ditkit.data.tokenizers import TOKENIZER_FILE, load_tokenizer

    where = [d for d in (ckpt_in, ckpt_in.parent.parent) if (d / TOKENIZER_FILE).is_file()] if ckpt_in is not None else []
    if not where and ckpt_in is None and cfg.train.init_from is not None:
        where = _init_source_tokenizer(cfg)  # a fine-tune keeps its source's token ids
    if cfg.modality != "text":
        from ditkit.data.captions import caption_tokenizer, caption_tokenizer_from_dict

        if where:
            tokenizer = caption_tokenizer_from_dict(json.loads((where[0] / TOKENIZER_FILE).read_text(encoding="utf-8")))
            fields = _init_source_caption_fields(cfg, tokenizer, where[0]) if ckpt_in is None else {}
            dataset = load_dataset(cfg.data, tokenizer)
            dataset.data_fields.update(fields)  # --init-from a prompt run: its tokenizer's kind and length size the encoder
            return dataset
        if ckpt_in is not None and is_caption_data(cfg.data) and not cfg.data.text_encoder:
            # never fit again: older runs rebuild theirs from the config, a fitted one is a ConfigError
            return load_dataset(cfg.data, caption_tokenizer(cfg.data))
        return load_dataset(cfg.data)
    from ditkit.data.text_loader import load_text_data

    if ckpt_in is not None and not where:
        raise ConfigError(f"{ckpt_in} holds no {TOKENIZER_FILE}: it was not trained on text by ditkit")
    return load_text_data(cfg.data, load_tokenizer(where[0]) if where else None)


def _init_source_tokenizer(cfg: Config) -> list[Path]:
    """The folder holding the tokenizer of a ditkit ``--init-from`` source (its checkpoint, else its
    run folder; [] for other sources): a fine-tuned text or prompt model must read the ids its
    embeddings were trained on, not a vocabulary fitted again on the new data."""
    from ditkit.data.tokenizers import TOKENIZER_FILE

    source = Path(cfg.train.init_from)
    if not source.is_dir() or (cfg.modality != "text" and not (is_caption_data(cfg.data) and not cfg.data.text_encoder)):
        return []
    folders = [d for d in (latest_checkpoint(source), source) if d is not None]  # its newest checkpoint, then itself
    found = [d for d in folders if (d / TOKENIZER_FILE).is_file()][:1]
    if not found and any((d / CONFIG_FILE).is_file() for d in folders):  # a ditkit run or checkpoint
        raise ConfigError(f"--init-from {source} holds no {TOKENIZER_FILE}, which a text or prompt model needs to "
                          "read its token ids: start from a text or prompt run (or copy the file back beside its config.json)")
    return found


def _init_source_caption_fields(cfg: Config, tokenizer: Any, folder: Path) -> dict[str, Any]:
    """The data fields a fine-tune takes from its prompt source's caption ``tokenizer`` (read from
    ``folder``): its kind (``bytes``, the ``grammar`` of shapes_captions, or fitted ``words``) and
    length, so the new run builds the source's encoder (a grammar or byte encoder has 259 rows, a
    fitted one its vocabulary's). ConfigError when the user asked for another kind or length."""
    from ditkit.data.captions import ByteCaptionTokenizer, caption_tokenizer

    if isinstance(tokenizer, ByteCaptionTokenizer):
        kind = "bytes"
    else:
        grammar = caption_tokenizer(dataclasses.replace(cfg.data, caption_tokenizer="grammar"))
        kind = "grammar" if tokenizer.hf.get_vocab() == grammar.hf.get_vocab() else "words"
    fields = {"caption_tokenizer": kind, "max_caption_length": int(tokenizer.max_length)}
    defaults = DataConfig()
    for key, value in fields.items():
        asked = getattr(cfg.data, key)
        if asked != getattr(defaults, key) and asked != value:
            raise ConfigError(f"data.{key}={asked!r}: the --init-from source {folder} reads captions with "
                              f"{key}={value!r}, which its weights need; drop the setting or start a fresh run")
    return fields


def _resolve_data(cfg: Config, dataset: Any) -> Config:
    """A copy of ``cfg`` with what the data decides (``channels`` or ``vocab_size``,
    ``num_classes``, ``class_names``), so the saved config alone rebuilds the model and names the
    labels. Checks a user's dataset against ``data.image_size``."""
    resolved = Config.from_dict(cfg.to_dict())
    if cfg.modality == "text":  # a TextTrainingSet: the tokenizer decides the vocabulary
        resolved.data.vocab_size = dataset.tokenizer.vocab_size
    elif cfg.modality == "audio":  # log-mels (N, n_mels, frames): the mel settings decide the sizes
        resolved.data.channels = 1
    else:
        size = tuple(dataset.images.shape[-2:])
        if size != (cfg.data.image_size, cfg.data.image_size):
            raise ConfigError(
                f"the dataset's images are {size[0]}x{size[1]} but data.image_size is {cfg.data.image_size}: "
                f"resize them or set --image-size {size[-1]}"
            )
        resolved.data.channels = getattr(dataset, "channels", None) or int(dataset.images.shape[1])
    resolved.data.num_classes = int(getattr(dataset, "num_classes", 0) or 0)
    names = list(getattr(dataset, "class_names", None) or [])
    resolved.data.class_names = names if resolved.data.num_classes and len(names) == resolved.data.num_classes else None
    for key, value in getattr(dataset, "data_fields", {}).items():  # e.g. a frozen text encoder's hash and width
        setattr(resolved.data, key, value)
    if is_caption_data(cfg.data) and not cfg.data.text_encoder:  # a fitted caption vocabulary sizes the encoder
        from ditkit.data.captions import CaptionTokenizer, caption_tokenizer_kind

        saved = getattr(dataset, "saved_tokenizer", None)
        if caption_tokenizer_kind(resolved.data) == "words" and isinstance(saved, CaptionTokenizer):
            resolved.data.caption_vocab_size = int(saved.vocab_size)
    return resolved


def _batch_sampler(cfg: Config, dataset: Any, latent_cache: Any, device: torch.device) -> Any:
    t = cfg.train
    micro_batch = t.global_batch_size // t.grad_accum_steps
    if latent_cache is not None:
        from ditkit.data.latents import LatentBatchSampler

        return LatentBatchSampler(latent_cache, micro_batch, seed=t.seed, hflip=cfg.data.hflip, device=device)
    if cfg.modality == "text":
        from ditkit.data.text_loader import TextBatchSampler

        return TextBatchSampler(dataset, micro_batch, seed=t.seed, hflip=cfg.data.hflip, device=device)
    return EpochBatchSampler(dataset, micro_batch, seed=t.seed, hflip=cfg.data.hflip, device=device)


def _run_length(cfg: Config, dataset: Any) -> Optional[int]:
    """Optimiser steps of the run; None when only a time budget ends it."""
    t = cfg.train
    if t.max_steps is None and t.epochs is None:
        return None
    return cfg.run_length(max(1, len(dataset) // t.global_batch_size))


def _evaluator(cfg: Config, dataset: Any, device: torch.device, dtype: torch.dtype, vae: Any, log: Callable[[str], None]) -> Any:
    """Built once: trains (or loads) the feature classifier and reference statistics; text:
    validation bits per character."""
    if cfg.modality == "text":
        from ditkit.eval.text_model import TextPeriodicEvaluator as Evaluator
    else:
        from ditkit.eval.model_eval import PeriodicEvaluator as Evaluator
    return Evaluator(cfg, dataset, device=device, dtype=dtype, vae=vae, log=log)


# ---- the loop ------------------------------------------------------------------------------------


def train(
    cfg: Config,
    model: Optional[nn.Module] = None,
    dataset: Any = None,
    *,
    resume: Optional[str | Path] = None,
    stop_at_step: Optional[int] = None,
    on_step: Optional[Callable[[int], None]] = None,
    log: Callable[[str], None] = _stderr,
    clock: Callable[[], float] = time.perf_counter,
) -> TrainResult:
    """Train as configured and return where it went.

    Args:
        cfg: the full config (``cfg.validate()`` is called here too).
        model: your own network instead of the configured one: an ``nn.Module`` called as
            ``model(x, t, y)`` (``x`` a batch ``(B, C, H, W)`` in [-1, 1] or token ids ``(B, L)``,
            ``t`` ``(B,)`` float times on the objective's scale, ``y`` ``(B,)`` int64 labels or None)
            returning what the objective needs (image: ``(B, C, H, W)``, or ``2C`` channels with
            ``objective.learn_sigma``; text: logits ``(B, L, V)``). Checkpoints hold its
            ``state_dict``; the saved config still names ``cfg.model``, so ``ditkit sample`` cannot
            rebuild it; resume by passing the same module again.
        dataset: your own data instead of ``cfg.data.dataset``. Images: any object with ``images``
            (``(N, C, H, W)`` uint8 tensor, ``H = W = data.image_size``), ``labels`` (``(N,)`` int64 or
            None), ``num_classes`` (0: unconditional), ``source`` (str, for messages) and ``len()``;
            optional ``class_names`` (saved as ``data.class_names``), ``channels``. Text: a
            ``ditkit.data.TextTrainingSet``. ``ditkit.data.ImageDataset`` has all of it.
        resume: a run directory or checkpoint to continue from (its newest checkpoint for a run
            directory). The model, objective and data sections must match the checkpoint's.
        stop_at_step: save a checkpoint and return once this step is reached, as if interrupted
            (for time-sliced jobs; the learning-rate schedule still spans the whole run).
        on_step: called with the step number after every optimiser step.
        log: where progress lines go (stderr by default).
        clock: seconds for ``train.time_budget`` (``time.perf_counter``; tests pass a fake one).

    Raises:
        ConfigError: bad values, found before any training step.
        NonFiniteLossError: the loss became NaN/inf; the newest checkpoint on disk is the last
            good one.
    """
    t0 = time.time()
    preflight(cfg, check_model=model is None, check_data=dataset is None)
    budget_s = parse_duration(cfg.train.time_budget) if cfg.train.time_budget is not None else None
    ctx = setup_distributed(cfg)  # torchrun: rank, device, process group (ditkit.train.distributed)
    if not ctx.is_main:
        log = lambda message: None  # noqa: E731  (rank 0 reports)
    hooks: list[Hook] = []
    with _process_state_restored():
        try:
            cfg, run_dir, ckpt_in, dataset, state, objective, net, vae, compiled = _setup(cfg, model, dataset, resume, ctx, log)
            start_step, t = state.step, cfg.train
            total_steps = _run_length(cfg, dataset)
            if _finished(cfg, state, total_steps, budget_s, run_dir, log):
                return TrainResult(run_dir, state.step, ckpt_in, False, None, time.time() - t0, "finished", state.elapsed_s)
            run = Run(cfg, run_dir, ctx, ctx.device, resolve_precision(t.precision, ctx.device), total_steps, log,
                      TrainingClock(state.elapsed_s, clock), budget_s, last_ckpt=ckpt_in,
                      best=read_best(run_dir, state.step) if t.keep_best and ctx.is_main else None)
            hooks = _hooks(run, state, dataset, vae, stop_at_step, objective)
            with _graceful_interrupt(log) as run.interrupt:
                state.model.train()
                first_step_start = time.perf_counter() if compiled else None
                while not run.done(state):
                    run.lr_of_step = run.lr(state)
                    loss, grad_norm = train_step(state, objective, net, ctx, lr=run.lr_of_step, grad_accum_steps=t.grad_accum_steps,
                                                 grad_clip=t.grad_clip, device=run.device, dtype=run.dtype)
                    if first_step_start is not None:  # report the compilation time (one sync, once)
                        loss.item()  # wait for the device, so the time is the step's
                        log(f"torch.compile: first step {time.perf_counter() - first_step_start:.1f} s, compilation included")
                        first_step_start = None
                    run.record(state, loss, grad_norm)
                    if on_step is not None:
                        on_step(state.step)
                    for hook in hooks:
                        hook.after_step(state, run)
                    if run.stop_reason is not None:
                        break
                state.model.eval()
            _report_stop(run, state, start_step)
        finally:
            for hook in hooks:
                hook.close()
            ctx.close()
    return TrainResult(run_dir, state.step, run.last_ckpt, run.stop_reason == "interrupt", run.last_loss,
                       time.time() - t0, run.stop_reason, state.elapsed_s, state.step - start_step)


def _setup(
    cfg: Config, model: Optional[nn.Module], dataset: Any, resume: Optional[str | Path], ctx: Any, log: Callable[[str], None]
) -> tuple[Config, Path, Optional[Path], Any, TrainState, Any, nn.Module, Any, bool]:
    """Everything before the first step: the run directory (or the checkpoint to resume), data,
    model, objective, EMA, optimiser and sampler in a ``TrainState`` (restored on resume), the
    network the loss calls (DDP / FSDP2 / compiled) and the run's files. Returns ``(cfg with the
    data resolved, run_dir, ckpt_in, dataset, state, objective, net, vae, compiled)``."""
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
    t, device = cfg.train, ctx.device  # cuda:LOCAL_RANK under torchrun
    if device.type == "cuda":  # restored when train returns (_process_state_restored)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(t.seed)  # model init and label dropout; restored from the checkpoint on resume
    if dataset is None:
        dataset = _load_data(cfg, ckpt_in)
    cfg = _resolve_data(cfg, dataset)
    latent_cache = vae = None
    if cfg.data.vae is not None:  # latent diffusion: train on cached VAE latents, sample through the decoder
        from ditkit.interop.training import prepare_latent_data

        with ctx.main_first():  # rank 0 builds the cache on disk, the other ranks then reuse it
            cfg, latent_cache, vae = prepare_latent_data(cfg, dataset, device, log)
    base_dtype = _lora_base_dtype(cfg, ctx) if t.lora_rank else None  # checked before any file is written
    own_model = model is not None
    model = (model if own_model else build_model(cfg)).to(device)
    # fine-tuning: pretrained weights, fresh optimiser. A LoRA checkpoint holds no base, so a resumed
    # LoRA run loads the base again (restore_adapter then checks it is the same, by its hash).
    if t.init_from is not None and (ckpt_in is None or t.lora_rank):
        from ditkit.interop.training import apply_init_from

        apply_init_from(model, cfg, run_dir, log if ckpt_in is None else (lambda m: None),
                        write_record=ctx.is_main and ckpt_in is None)  # the same weights on every rank
    if t.lora_rank:
        _apply_lora(model, cfg, base_dtype)  # before the EMA: it copies the adapted model
    objective = training_objective(cfg)
    ema = EMA(model, t.ema_decay, t.ema_warmup)
    if t.lora_rank:  # the frozen base is the same in the EMA: share its tensors instead of holding a copy
        for ema_param, param in zip(ema.model.parameters(), model.parameters()):
            if not param.requires_grad:
                ema_param.data = param.data
    net = ctx.wrap(model, ema)  # what the loss calls: model (one process), DDP, or FSDP2 (shards model and EMA)
    sampler = ctx.shard_sampler(_batch_sampler(cfg, dataset, latent_cache, device))  # this rank's rows
    if getattr(dataset, "conditions", None) is not None:  # frozen text encoder: caption indices -> cached states
        from ditkit.data.captions import CaptionConditionBatches

        sampler = CaptionConditionBatches(sampler, dataset.conditions, dropout=cfg.data.caption_dropout, seed=t.seed,
                                          device=device)
    noise = torch.Generator().manual_seed(t.seed + 1)  # diffusion times and noise (CPU: same on any device)
    state = TrainState(model, ema, build_optimizer(model, t, device), sampler, noise)
    if ckpt_in is not None:
        state.load(ckpt_in, distributed=ctx.active or is_sharded_checkpoint(ckpt_in))  # DDP / FSDP2 layouts
        log(f"resumed {ckpt_in} at step {state.step} (epoch {sampler.epoch}, batch {sampler.position})")
    total_steps = _run_length(cfg, dataset)
    compiled = compile_enabled(t.compile, device, None if total_steps is None else total_steps - state.step)
    if compiled:
        net = torch.compile(net)  # same parameters: optimiser, EMA and checkpoints see the plain model
    text = cfg.modality == "text"
    if ctx.is_main:  # only rank 0 writes files
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / CONFIG_FILE, cfg.to_json().encode())
        saved_tokenizer = dataset.tokenizer if text else getattr(dataset, "saved_tokenizer", None)  # prompts too
        if saved_tokenizer is not None:
            from ditkit.data.tokenizers import save_tokenizer

            save_tokenizer(saved_tokenizer, run_dir)
    what = dataset.describe() if hasattr(dataset, "describe") else (
        f"{getattr(dataset, 'source', 'your dataset')} ({len(dataset)} images {cfg.data.image_size}x{cfg.data.image_size}"
        f"x{cfg.data.channels}, {cfg.data.num_classes or 'no'} classes)"
    )
    length = f"{total_steps} steps" if total_steps is not None else "no step limit"
    budget = f" within {t.time_budget}" if t.time_budget is not None else ""
    dtype = resolve_precision(t.precision, device)
    trainable = sum(p.numel() for p in state.params)
    lora = f", LoRA rank {t.lora_rank}: {trainable / 1e6:.3f}M trainable" if t.lora_rank else ""
    log(
        f"run {run_dir}: {'your ' + type(model).__name__ if own_model else cfg.model.name} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params{lora}) on {what}, "
        f"{length}{budget} of batch {t.global_batch_size}, "
        f"{device.type} {str(dtype).removeprefix('torch.')}{', torch.compile' if compiled else ''}{ctx.describe()}"
    )
    return cfg, run_dir, ckpt_in, dataset, state, objective, net, vae, compiled


def _lora_base_dtype(cfg: Config, ctx: Any) -> Optional[torch.dtype]:
    """The dtype to keep a LoRA run's frozen base in (None: as loaded); refuses what cannot run."""
    t = cfg.train
    base_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(t.lora_base_dtype or "")
    if base_dtype is torch.bfloat16 and resolve_precision(t.precision, ctx.device) != torch.bfloat16:
        raise ConfigError("train.lora_base_dtype=bf16 needs bf16 autocast: add --precision bf16 (or drop lora_base_dtype)")
    return base_dtype


def _apply_lora(model: nn.Module, cfg: Config, base_dtype: Optional[torch.dtype]) -> None:
    """Freeze ``model`` (the --init-from base) and inject the run's trainable LoRA adapter
    (``ditkit.adapters.apply_lora``; the adapter records the base's name and hash), with trainable
    copies of ``train.lora_train_modules`` (e.g. the label table) when given."""
    from ditkit.adapters import apply_lora

    t = cfg.train
    apply_lora(model, t.lora_rank, t.lora_alpha, t.lora_targets, t.lora_dropout, t.lora_variant,
               base_dtype=base_dtype, base_model=str(t.init_from), train_modules=t.lora_train_modules)


def _hooks(run: Run, state: TrainState, dataset: Any, vae: Any, stop_at_step: Optional[int], objective: Any) -> list[Hook]:
    """The hooks in the order they act after each step: log, sample grid, evaluation, stop, save
    (and MaskDiT's unmasking phase first, when asked)."""
    t, ctx = run.cfg.train, run.ctx
    tokenizer = dataset.tokenizer if run.cfg.modality == "text" else None
    # written beside every checkpoint's config.json: the text tokenizer, or a prompt run's caption tokenizer
    saved_tokenizer = tokenizer if tokenizer is not None else getattr(dataset, "saved_tokenizer", None)
    evaluator = _evaluator(run.cfg, dataset, run.device, run.dtype, vae, run.log) if t.eval_every and ctx.is_main else None
    logger = MetricsLogger(run.cfg, run.run_dir, state.step, run.total_steps, run.log, run.budget_s) if ctx.is_main else NullLogger()
    extra = {"lr_schedule": {"kind": t.lr_schedule, "warmup_steps": t.warmup_steps, "total_steps": run.total_steps,
                             "time_budget_s": run.budget_s, "decay_fraction": t.decay_fraction}}
    unmask = run.cfg.objective.mask_ratio and run.cfg.objective.unmask_fraction
    return [
        *([UnmaskHook(objective, run.cfg.objective.unmask_fraction, state, run)] if unmask else []),
        LogHook(logger, t.log_every),
        SampleGridHook(t.sample_every, vae=vae, tokenizer=saved_tokenizer, logger=logger),
        EvalHook(t.eval_every, evaluator, logger, t.keep_best),
        StopHook(stop_at_step),
        CheckpointHook(t.ckpt_every, checkpoint_saver(run, lambda: extra, saved_tokenizer), t.keep_last),
    ]


def _finished(
    cfg: Config, state: TrainState, total_steps: Optional[int], budget_s: Optional[float], run_dir: Path, log: Callable[[str], None]
) -> bool:
    """A resumed run with nothing left to do: say so and how to extend it."""
    if total_steps is not None and state.step >= total_steps:
        log(f"{run_dir} is already finished: step {state.step} of {total_steps}. To train longer, resume with a "
            f"higher --max-steps (e.g. ditkit train --resume {run_dir} --max-steps {2 * total_steps})")
        return True
    if budget_s is not None and state.elapsed_s >= budget_s:
        log(f"{run_dir} is already finished: its time budget of {cfg.train.time_budget} is spent "
            f"({format_duration(state.elapsed_s)} of training, {state.step} steps). To train longer, resume with "
            f"a larger --time-budget (e.g. ditkit train --resume {run_dir} --time-budget {duration_flag(2 * budget_s)})")
        return True
    return False


def _report_stop(run: Run, state: TrainState, start_step: int) -> None:
    """One line when the run stopped before its length: why, the checkpoint, how to continue."""
    continue_with = f"Continue with: ditkit train --resume {run.run_dir}"
    if run.stop_reason == "budget":
        run.log(f"time budget {run.cfg.train.time_budget} spent: {state.step} steps fitted "
                f"({state.step - start_step} in this session, {state.elapsed_s:.0f} s of training); checkpoint {run.last_ckpt}. "
                f"To train longer: ditkit train --resume {run.run_dir} --time-budget {duration_flag(2 * (run.budget_s or 0))}")
    elif run.stop_reason is not None:
        run.log(f"{'interrupted' if run.stop_reason == 'interrupt' else 'stopped'} at step {state.step}; "
                f"checkpoint {run.last_ckpt}. {continue_with}")
