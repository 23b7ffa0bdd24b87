"""The training state and one optimiser step.

``TrainState`` holds everything a run must carry from one step to the next and a checkpoint must
hold to continue it exactly: model, EMA, optimiser, the data sampler's position, the diffusion
noise generator and torch's global RNG (label dropout), the step and the training seconds spent
(for ``train.time_budget``). ``state_dict()`` is the ``state.pt`` of a checkpoint (the weights go to
safetensors beside it); ``load(ckpt)`` restores all of it.

``train_step(state, ...)`` is one optimiser step: ``grad_accum_steps`` micro-batches of forward
(autocast) and backward, gradient clipping, AdamW, EMA update. It returns the step's mean loss and
gradient norm as device tensors (no host sync).

``lr_at`` is the learning-rate schedule: a pure function of the step (or, with a time budget, of
the training seconds spent), so a resumed run continues it exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

import ditkit
from ditkit.adapters import adapters_of, restore_adapter
from ditkit.checkpoint_io import ADAPTER_DIR, EMA_ADAPTER_DIR
from ditkit.config import TrainConfig
from ditkit.train.checkpoint import load_training_state, load_weights
from ditkit.train.ema import EMA
from ditkit.train.precision import autocast

__all__ = ["TrainState", "train_step", "build_optimizer", "lr_at", "rng_state", "restore_rng_state"]


# ---- learning rate ---------------------------------------------------------------------------------


def lr_at(
    step: int,
    t: TrainConfig,
    total_steps: Optional[int],
    *,
    elapsed_s: Optional[float] = None,
    budget_s: Optional[float] = None,
) -> float:
    """Learning rate of optimiser step ``step`` (0-based).

    Linear warm-up over ``t.warmup_steps``, then by ``t.lr_schedule``:

    * ``constant``: ``t.lr``;
    * ``cosine``: decay to ``lr * min_lr_ratio`` at the end of the run (Loshchilov & Hutter 2017);
    * ``wsd`` (warmup-stable-decay, Hu et al. 2024 "MiniCPM", Sec. 4): constant, then a linear
      decay to ``lr * min_lr_ratio`` over the last ``t.decay_fraction`` of the run.

    The end of the run is ``total_steps`` steps, or with ``budget_s`` (``train.time_budget`` in
    seconds) the budget: progress is then ``elapsed_s / budget_s``, the training seconds spent
    before this step, so the schedule needs no step count in advance.
    """
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    # where the run stands: ``done`` of ``length`` (training seconds of the budget, or steps)
    if budget_s is not None:
        done, length = min(max(elapsed_s or 0.0, 0.0), budget_s), budget_s
    elif t.lr_schedule == "wsd":
        done, length = min(step, total_steps or 1), max(1, total_steps or 1)  # the decay is a fraction of the whole run
    else:
        done, length = step - t.warmup_steps, max(1, (total_steps or 1) - t.warmup_steps)
    if t.lr_schedule == "cosine":
        progress = min(1.0, done / length)
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    # wsd: the fraction of the decay window still ahead, 1 at its start and 0 at the end of the run
    remaining = min(1.0, (length - done) / (t.decay_fraction * length))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * remaining)


# ---- RNG state ---------------------------------------------------------------------------------


def rng_state(noise: torch.Generator) -> dict[str, Any]:
    """torch's global RNG (CPU and every CUDA device) and the noise generator's state."""
    state: dict[str, Any] = {"torch_cpu": torch.get_rng_state(), "noise": noise.get_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], noise: torch.Generator) -> None:
    """Put torch's global RNG (label dropout) and the noise generator back where they were."""
    torch.set_rng_state(state["torch_cpu"])
    noise.set_state(state["noise"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


# ---- the state ---------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices only (not biases or norms);
    fused where this torch has it for ``device``. Build it after the model is sharded (FSDP2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # biases, norms
    ]
    fused = device.type == "cuda" or tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=fused, foreach=None if fused else True)


@dataclass
class TrainState:
    """What a run carries from step to step and a checkpoint restores.

    ``sampler``: the batch sampler (``next_batch() -> (x, y)``, ``state_dict``/``load_state_dict``,
    ``epoch``, ``position``). ``noise``: the CPU generator of diffusion times and noise.
    ``elapsed_s``: training seconds spent so far over every session of the run (sample grids and
    evaluation excluded), what ``train.time_budget`` and its schedule count.
    """

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    sampler: Any
    noise: torch.Generator
    step: int = 0
    elapsed_s: float = 0.0
    params: list[nn.Parameter] = field(default_factory=list)  # the trainable parameters (clipping)

    def __post_init__(self) -> None:
        if not self.params:
            self.params = [p for p in self.model.parameters() if p.requires_grad]

    def state_dict(self, *, lr_schedule: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The ``state.pt`` of a checkpoint: step, epoch, optimiser, EMA counters, data position,
        RNG states, training seconds (weights are saved separately)."""
        return {
            "step": self.step,
            "epoch": self.sampler.epoch,
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "data": self.sampler.state_dict(),
            "rng": rng_state(self.noise),
            "elapsed_s": self.elapsed_s,
            "lr_schedule": lr_schedule or {},
            "ditkit_version": ditkit.__version__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved; the optimiser only when ``state`` holds it (an FSDP
        checkpoint keeps it in its shards, see ``load``)."""
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.sampler.load_state_dict(state["data"])
        restore_rng_state(state["rng"], self.noise)
        self.step = int(state["step"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))  # checkpoints before time budgets: 0

    def load(self, ckpt: Path, *, distributed: bool = False) -> None:
        """Weights, optimiser and the rest from checkpoint ``ckpt``. ``distributed``: this process
        is one of several, or the checkpoint is an FSDP run's (``sharded/``): read through
        ``ditkit.train.distributed.load_training_checkpoint``, which reshards as needed. A LoRA
        run's checkpoint restores its adapters (``restore_adapter``: same settings and base hash)
        into the adapters ``apply_lora`` made; the base came from ``--init-from``."""
        state = load_training_state(ckpt)
        if adapters_of(self.model):  # a LoRA run: the checkpoint holds the adapters, --init-from the base
            restore_adapter(self.model, Path(ckpt) / ADAPTER_DIR)  # FSDP2: each rank keeps its shards
            restore_adapter(self.ema.model, Path(ckpt) / EMA_ADAPTER_DIR)
            if distributed:
                from ditkit.train.distributed import _is_fsdp, load_one_process_optimizer

                if _is_fsdp(self.model):  # the optimiser of one process's numbering, into this rank's shards
                    load_one_process_optimizer(ckpt, self.model, self.optimizer, state)
                    state = {k: v for k, v in state.items() if k != "optimizer"}
        elif distributed:
            from ditkit.train.distributed import load_training_checkpoint

            load_training_checkpoint(ckpt, self.model, self.ema.model, self.optimizer, state)
            state = {k: v for k, v in state.items() if k != "optimizer"}
        else:
            self.model.load_state_dict(load_weights(ckpt, "model"))
            self.ema.model.load_state_dict(load_weights(ckpt, "ema"))
        self.load_state_dict(state)


# ---- one step ----------------------------------------------------------------------------------


def train_step(
    state: TrainState,
    objective: Any,
    net: nn.Module,
    ctx: Any,
    *,
    lr: float,
    grad_accum_steps: int,
    grad_clip: float,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """One optimiser step at learning rate ``lr``; returns ``(loss, grad_norm)``, 0-d device
    tensors (the step's mean loss over its micro-batches, the global gradient norm before
    clipping). ``net`` is what the loss calls (the model, DDP, FSDP2 or compiled); ``ctx`` the
    ``DistContext`` (one process: ``objective.loss(net, x, y, generator=noise).mean()``).
    ``grad_clip`` 0 measures the norm without clipping. Advances ``state.step``."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=device)
    for micro in range(grad_accum_steps):
        x, y = state.sampler.next_batch()
        with ctx.accumulate(net, last=micro == grad_accum_steps - 1):
            with autocast(device, dtype):
                loss = ctx.loss(objective, net, x, y, state.noise)
            (loss / grad_accum_steps).backward()
        step_loss += loss.detach().float() / grad_accum_steps
    grad_norm = ctx.clip_grad_norm(state.params, grad_clip if grad_clip > 0 else float("inf"))
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.update(state.model)
    state.step += 1
    return step_loss, grad_norm.float()


class TrainingClock:
    """Training seconds: ``start_s`` (spent in earlier sessions) plus the time since creation, less
    the time spent inside ``paused()`` blocks (sample grids, evaluation). ``clock`` returns seconds
    (``time.perf_counter``; tests inject a fake one)."""

    def __init__(self, start_s: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock, self.start_s = clock, start_s
        self._t0, self._paused = clock(), 0.0

    def elapsed(self) -> float:
        return self.start_s + (self.clock() - self._t0) - self._paused

    def pause(self) -> "_Pause":
        return _Pause(self)


class _Pause:
    def __init__(self, clock: TrainingClock) -> None:
        self.clock = clock

    def __enter__(self) -> None:
        self._t = self.clock.clock()

    def __exit__(self, *exc: Any) -> None:
        self.clock._paused += self.clock.clock() - self._t
