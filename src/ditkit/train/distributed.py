"""Several processes with torchrun: DDP and FSDP2 training, sharded checkpoints, shared sampling.

``torchrun --nnodes N --nproc-per-node M -m ditkit train ...`` runs ``train(cfg)`` once per process;
this module is everything that differs from one process (see docs/distributed.md). ``train``
calls ``setup_distributed(cfg)`` and talks to the returned ``DistContext``; without torchrun the
context is inactive and every hook is the single-process code unchanged.

**One random stream, cut into shares (the design choice).** A run at global batch ``B`` on ``W``
processes must give the same weights as one process at batch ``B``. So nothing random is drawn per
rank. Every rank holds the same three streams as one process, seeded from ``--global-seed``:

* the data order (``ditkit.data.sampler``: a permutation per epoch from ``(seed, epoch)``); rank
  ``r`` gathers rows ``[r b, (r + 1) b)`` of each global micro-batch, ``b = B / (W * accum)``;
* the diffusion times and noise (one ``torch.Generator``): every rank draws them *for the whole
  global micro-batch* with the objective's own sampling helpers and keeps its rows
  (``global_draws``), so sample ``i`` gets the ``t_i`` and ``eps_i`` it gets in one process;
* the label dropout of classifier-free guidance (torch's global RNG, drawn inside
  ``LabelEmbedder``): drawn here for the whole micro-batch before the forward, sliced, and the
  embedder's own dropout switched off for that forward.

Each rank's loss is the mean over its ``b`` rows and DDP / FSDP average the gradients over the
ranks, which is the mean over the ``B`` rows: the gradient of one process, up to the order of
float additions in the all-reduce (``allclose``, not bitwise). The per-rank randomness is still
"derived from --global-seed", by position rather than by a per-rank seed: the official DiT's
``seed = global_seed * world_size + rank`` was rejected because it ties the run to the number of
processes. Here the RNG and data state is identical on every rank and independent of ``W``, so a
checkpoint holds one copy of it and resumes exactly on any number of processes (DDP and FSDP2).
The cost is that every rank draws the noise of the whole batch (one CPU ``randn`` of ``B x C x H x
W`` per micro-batch, small next to the network) and samples the whole batch's indices.

**DDP** (``train.parallel=ddp``, the default): the model is replicated; rank 0 writes the usual
checkpoint (the same files as one process), so 1 -> W and W -> 1 resumes need nothing special.
**FSDP2** (``train.parallel=fsdp``, ``torch.distributed.fsdp.fully_shard`` per transformer block
and at the root): parameters, gradients, optimiser state and the EMA copy are sharded over the
ranks. A checkpoint then holds ``sharded/`` (``torch.distributed.checkpoint``: model, EMA and
optimiser, written by every rank, resharded on load to any number of processes, or into an
unsharded model) next to ``model.safetensors`` / ``ema.safetensors`` gathered on rank 0 (so
``ditkit sample``, ``info`` and the interop tools read it like any other checkpoint) and a
``state.pt`` without the optimiser. A LoRA run is the exception: its checkpoint is the
one-process LoRA layout (adapters and ``state.pt`` with the optimiser), gathered onto rank 0
(``DistContext.gather_adapter_state``), so it resumes on any number of processes in either mode.
Sample grids and evaluation gather the EMA weights onto rank 0.

Only rank 0 writes logs, grids and checkpoints; every rank waits at a barrier until a checkpoint
is complete. Loss and gradient norm are averaged over the ranks when they are logged (the only
all-reduce outside the backward pass), and a Ctrl-C on any rank is honoured at the next logging
step, when all ranks agree on it. The backend is nccl on CUDA and gloo on the CPU; the device is
``cuda:LOCAL_RANK`` (correct on several nodes).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ditkit.config import Config, ConfigError
from ditkit.data.sampler import EpochBatchSampler
from ditkit.device import resolve_device
from ditkit.models.layers import LabelEmbedder
from ditkit.train.checkpoint import (
    SHARDED_DIR,
    load_weights,
    save_checkpoint,
    staging_dir,
    step_dir_name,
)
from ditkit.train.ema import EMA

__all__ = [
    "DistContext",
    "setup_distributed",
    "setup_sampling",
    "global_draws",
    "sharded_loss",
    "ShardedBatches",
    "is_sharded_checkpoint",
    "load_training_checkpoint",
    "NullLogger",
    "release_process_group",
]


# ---- process group and device -----------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def _process_device(name: str, local_rank: int, world_size: int) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` for auto/cuda when CUDA is there, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name.startswith("cuda:") and world_size > 1:
        raise ConfigError(
            f"--device {name} under torchrun: each process takes the GPU of its LOCAL_RANK; "
            "use --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if name.startswith("cuda:"):
        return resolve_device(name)
    resolve_device("cuda")  # raises with the fix when there is no GPU
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK {local_rank} but only {count} GPU(s) are visible on this node: "
            f"use --nproc-per-node {count} or fewer"
        )
    return torch.device("cuda", local_rank)


def _init_group(device: torch.device, world_size: int) -> None:
    """The default process group: env:// under torchrun, an in-memory store for one process."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "gloo" and not dist.is_gloo_available():
        raise ConfigError("this torch build has no gloo backend: install a torch build with distributed support")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    elif world_size == 1:  # FSDP in one process, started without torchrun
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        raise ConfigError(f"WORLD_SIZE={world_size} but no MASTER_ADDR: start the processes with torchrun")


_KEPT: list[Tensor] = []  # the last all-reduce operand of each released gloo group, never freed


def release_process_group() -> None:
    """Destroy the default process group, safely for gloo at process exit.

    Gloo's worker threads drop finished collectives a moment after the caller has seen them
    complete; if that drop frees a tensor whose Python object is gone while the interpreter is
    already exiting, the thread cannot take the GIL and the process aborts ("terminate called
    without an active exception", pytorch/pytorch#117762, #190489). So the last collective here is
    an all-reduce of a tensor that is never freed, followed by a short pause that lets the threads
    finish, before the group is destroyed. Every rank must call this.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        token = torch.zeros(1)
        dist.all_reduce(token)
        _KEPT.append(token)
        time.sleep(0.05)
    dist.destroy_process_group()


def setup_distributed(cfg: Config) -> "DistContext":
    """The process layout of a training run, from torchrun's environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``) or an already initialised default process group.

    One process and ``train.parallel=ddp``: an inactive context (nothing changes). Otherwise the
    process group is created if needed (nccl on CUDA, gloo on the CPU) and ``close()`` destroys
    what was created here. Raises ``ConfigError`` before any work when the global batch does not
    split over the processes and accumulation steps.
    """
    t = cfg.train
    initialized = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialized else _env_int("WORLD_SIZE", 1)
    if world_size == 1 and t.parallel == "ddp" and not initialized:
        return DistContext(device=resolve_device(t.device), parallel="ddp")
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed: run one process, or install a full torch build")
    shares = world_size * t.grad_accum_steps
    if t.global_batch_size % shares:
        lower = max(shares, t.global_batch_size // shares * shares)
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} does not split over {world_size} processes x "
            f"{t.grad_accum_steps} accumulation steps: use a multiple of {shares}, e.g. {lower} or {lower + shares}"
        )
    local_rank = _env_int("LOCAL_RANK", 0)
    device = _process_device(t.device, local_rank, world_size)
    if not initialized:
        _init_group(device, world_size)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
        parallel=t.parallel, active=True, owns_group=not initialized,
    )


def setup_sampling(device: str = "auto") -> "DistContext":
    """The process layout of ``ditkit sample``: under torchrun (``WORLD_SIZE`` > 1) a process group
    and ``cuda:LOCAL_RANK`` (or the CPU); otherwise an inactive context on ``device``."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size == 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=resolve_device(device))
    initialized = dist.is_initialized()
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = _process_device(device, local_rank, world_size)
    if not initialized:
        _init_group(dev, world_size)
    return DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
        active=True, owns_group=not initialized,
    )


# ---- the randomness of a global micro-batch ------------------------------------------------------------


def global_draws(
    objective: Any, x: Tensor, global_batch: int, rows: slice, generator: torch.Generator
) -> dict[str, Tensor]:
    """The random inputs ``objective.loss(model, x_global, y, generator)`` draws for a global
    micro-batch of ``global_batch`` samples, cut to this rank's ``rows``, as keyword arguments of
    ``objective.loss``: the objective's own ``global_draws`` (see ``ditkit.diffusion.objective``).
    ``x`` is this rank's share ``(b, ...)``. Raises ``TypeError`` for an objective without it."""
    draw = getattr(objective, "global_draws", None)
    if draw is None:
        raise TypeError(
            f"{type(objective).__name__} has no global_draws(x, global_batch, rows, generator): add it to share its noise over processes"
        )
    return draw(x, global_batch, rows, generator)


@contextlib.contextmanager
def _label_dropout_off(embedders: list[LabelEmbedder]) -> Iterator[None]:
    """The embedders skip their own dropout (``sharded_loss`` applied it for the whole batch)."""
    for emb in embedders:
        emb.training = False
    try:
        yield
    finally:
        for emb in embedders:
            emb.training = True


def sharded_loss(
    objective: Any,
    net: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor],
    x: Tensor,
    y: Optional[Tensor],
    generator: torch.Generator,
    rank: int,
    world_size: int,
    label_embedders: tuple[LabelEmbedder, ...] | list[LabelEmbedder] = (),
) -> Tensor:
    """Per-sample loss ``(b,)`` of rank ``rank``'s rows of a global micro-batch of ``b * world_size``.

    ``x`` ``(b, ...)`` and ``y`` ``(b,)`` are this rank's rows. Diffusion times and noise
    (``global_draws``) and the label dropout of ``label_embedders`` (the ``LabelEmbedder`` modules of
    the network, training mode) are drawn for the whole batch from ``generator`` and torch's global
    RNG, exactly as one process drawing the whole batch does; with ``world_size = 1`` this is
    ``objective.loss(net, x, y, generator=generator)`` bit for bit.
    """
    b = x.shape[0]
    global_batch, rows = b * world_size, slice(rank * b, (rank + 1) * b)
    dropping = [e for e in label_embedders if e.training and e.dropout_prob > 0]
    if len(dropping) > 1:
        raise ValueError("the network has several label embedders with dropout; sharded_loss expects one")
    if y is not None and dropping:
        emb = dropping[0]  # LabelEmbedder.forward's own draw, for the whole batch (Ho & Salimans 2022)
        drop = torch.rand(global_batch, device=y.device)[rows] < emb.dropout_prob
        y = torch.where(drop, torch.full_like(y, emb.num_classes), y)
    draws = global_draws(objective, x, global_batch, rows, generator)
    with _label_dropout_off(dropping):
        return objective.loss(net, x, y, generator=generator, **draws)


class ShardedBatches:
    """Any batch sampler (``next_batch() -> (x, y)``, ``state_dict``, ``epoch``, ...) cut to one rank's
    rows of each global batch, for samplers without their own ``shard`` (text chunks, VAE latents).
    The inner sampler makes the whole batch on every rank; state and attributes are the inner one's."""

    def __init__(self, sampler: Any, rank: int, world_size: int):
        if sampler.batch_size % world_size:
            raise ConfigError(
                f"the batch of {sampler.batch_size} does not split over {world_size} processes: use a "
                f"--global-batch-size divisible by {world_size} x train.grad_accum_steps"
            )
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        self.local_batch_size = sampler.batch_size // world_size

    def next_batch(self) -> tuple[Tensor, Optional[Tensor]]:
        x, y = self.sampler.next_batch()
        rows = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        return x[rows], (y[rows] if y is not None else None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["sampler"], name)


# ---- checkpoints ---------------------------------------------------------------------------------------


def is_sharded_checkpoint(ckpt: str | Path) -> bool:
    """True for a checkpoint written by an FSDP run (it holds ``sharded/``)."""
    return (Path(ckpt) / SHARDED_DIR).is_dir()


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` of one process (parameters numbered in param-group order) keyed by
    parameter name instead, the form ``set_optimizer_state_dict`` takes. ``optimizer`` must be built
    with the same groups in the same order (``train`` does)."""
    names = {param: name for name, param in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    if len(order) != sum(len(g["params"]) for g in saved["param_groups"]):
        raise ConfigError("the checkpoint's optimiser has other parameter groups than this model: start a new run")
    return {
        "state": {order[i]: value for i, value in saved["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def _optimizer_state_by_index(model: nn.Module, optimizer: torch.optim.Optimizer, by_name: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``_optimizer_state_by_name``: a state keyed by parameter name (what
    ``get_optimizer_state_dict`` returns) numbered in param-group order, as one process's
    ``optimizer.state_dict()`` is, so ``optimizer.load_state_dict`` of any layout takes it."""
    names = {param: name for name, param in model.named_parameters()}
    index = {names[p]: i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]],
    }


def load_one_process_optimizer(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A one-process checkpoint's optimiser (``state["optimizer"]``, numbered as one process numbers
    it: a plain or DDP run, or any LoRA run) into an FSDP2-sharded ``model``'s optimiser: each rank
    takes its shards. (A LoRA run's adapters are restored by ``ditkit.adapters.restore_adapter``,
    which handles sharded parameters.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if "optimizer" not in state:
        raise ConfigError(f"{ckpt}: state.pt holds no optimiser state, so the run cannot be resumed from it")
    by_name = _optimizer_state_by_name(model, optimizer, state["optimizer"])
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def load_training_checkpoint(
    ckpt: str | Path, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Model, EMA and optimiser from any checkpoint into any layout: one process, a DDP replica (the
    unwrapped module) or FSDP2 shards, on any number of processes. ``state`` is its ``state.pt``.

    * ``sharded/`` (an FSDP run): ``torch.distributed.checkpoint`` reads the shards each rank needs
      (resharding as needed; the whole tensors for unsharded models);
    * otherwise (one process or DDP): the safetensors and ``state["optimizer"]``; FSDP2 models take
      their shards of the full tensors.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    ckpt = Path(ckpt)
    if is_sharded_checkpoint(ckpt):
        import torch.distributed.checkpoint as dcp

        states = {
            "model": get_model_state_dict(model),
            "ema": get_model_state_dict(ema_model),
            "optimizer": get_optimizer_state_dict(model, optimizer),  # initialises the Adam state
        }
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(states, checkpoint_id=str(ckpt / SHARDED_DIR), no_dist=not dist.is_initialized())
        set_model_state_dict(model, states["model"])
        set_model_state_dict(ema_model, states["ema"])
        set_optimizer_state_dict(model, optimizer, states["optimizer"])
    elif _is_fsdp(model):
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, load_weights(ckpt, "model"), options=full)
        set_model_state_dict(ema_model, load_weights(ckpt, "ema"), options=full)
        load_one_process_optimizer(ckpt, model, optimizer, state)
    else:
        model.load_state_dict(load_weights(ckpt, "model"))
        ema_model.load_state_dict(load_weights(ckpt, "ema"))
        optimizer.load_state_dict(state["optimizer"])


# ---- the context the training loop talks to --------------------------------------------------------------


class NullLogger:
    """The metrics logger of ranks other than 0: every method does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _rebind_ema(ema: EMA, model: nn.Module) -> None:
    """Point ``ema``'s averaged pairs at the sharded parameters, as ``EMA.__init__`` pairs them
    (``fully_shard`` replaces every parameter object of the modules it shards). Frozen parameters
    (the fixed position table; a LoRA run's whole base) are equal in both at this point and no
    step changes them, so they are not copied at every update: sharding gave model and EMA separate
    storage (the tensors a LoRA run's EMA shared with the model in one process), and the copy
    would be a pass over the whole base shard per step. Buffers are still copied."""
    pairs = list(zip(ema.model.parameters(), model.parameters()))
    ema._avg = [(e, p) for e, p in pairs if p.requires_grad]
    ema._copy = list(zip(ema.model.buffers(), model.buffers()))


@dataclass
class DistContext:
    """Where this process stands (rank, world size, device) and the few operations that differ from
    one process. ``active`` is False for a plain single-process run: then every method is the
    single-process behaviour (and ``train`` keeps its original code paths)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    parallel: str = "ddp"  # "ddp" | "fsdp"
    active: bool = False
    owns_group: bool = False
    _label_embedders: list[LabelEmbedder] = field(default_factory=list)
    _stop: bool = False
    _gather_target: Optional[nn.Module] = None  # rank 0, FSDP: an unsharded EMA copy on the CPU
    _token: Optional[Tensor] = None  # the barrier's all-reduce operand

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs, grids and checkpoints."""
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.active and self.parallel == "fsdp"

    def describe(self) -> str:
        if not self.active:
            return ""
        return f", {self.world_size} processes ({self.parallel}, {dist.get_backend()})"

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            release_process_group()
            self.owns_group = False

    def barrier(self) -> None:
        """Wait for every rank. An all-reduce of a tensor this context keeps, not ``dist.barrier()``:
        gloo's barrier holds earlier collectives in its worker thread, which may then free Python
        tensors while the interpreter exits and abort the process (pytorch/pytorch#117762)."""
        if self.active:
            if self._token is None:
                self._token = torch.zeros(1, device=self.device)
            dist.all_reduce(self._token)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. builds a cache on disk), the other ranks after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object, e.g. the run directory)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` (a float, e.g. the training seconds of a time budget) on every rank:
        one small broadcast, so that a learning rate or a stop decided from a clock is the same on
        all ranks. One process: ``value`` itself."""
        if not self.active:
            return value
        box = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(box, src=0)
        return float(box.item())

    # ---- setup
    def shard_sampler(self, sampler: Any) -> Any:
        """This rank's share of a sampler's global batches (``EpochBatchSampler.shard`` when the
        sampler has it, else ``ShardedBatches``)."""
        if not self.active:
            return sampler
        if isinstance(sampler, EpochBatchSampler) and type(sampler).next_batch is EpochBatchSampler.next_batch:
            sampler.shard(self.rank, self.world_size)
            return sampler
        return ShardedBatches(sampler, self.rank, self.world_size)

    def wrap(self, model: nn.Module, ema: EMA) -> nn.Module:
        """The network the loss calls: ``model`` itself (one process; FSDP2, sharded in place
        together with the EMA copy) or a DDP wrapper. Call after building the EMA and before the
        optimiser, which must see the sharded parameters."""
        self._label_embedders = [m for m in model.modules() if isinstance(m, LabelEmbedder)]
        if not self.active:
            return model
        if self.parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            if self.is_main:  # grids and evaluation load the gathered EMA weights into this copy
                self._gather_target = copy.deepcopy(ema.model).to("cpu")
            for module in (model, ema.model):
                for block in getattr(module, "blocks", []):  # one all-gather per block in forward
                    fully_shard(block, mesh=mesh)
                fully_shard(module, mesh=mesh)
            _rebind_ema(ema, model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ---- one step
    def loss(self, objective: Any, net: nn.Module, x: Tensor, y: Optional[Tensor], generator: torch.Generator) -> Tensor:
        """Mean loss of this rank's micro-batch (``objective.loss(...).mean()`` in one process; see
        ``sharded_loss`` for several)."""
        if not self.active:
            return objective.loss(net, x, y, generator=generator).mean()
        return sharded_loss(objective, net, x, y, generator, self.rank, self.world_size, self._label_embedders).mean()

    @contextlib.contextmanager
    def accumulate(self, net: nn.Module, last: bool) -> Iterator[None]:
        """DDP: no gradient all-reduce before the last micro-batch of a step (same result, less
        traffic). FSDP2 reduce-scatters every micro-batch (sharded gradients keep memory low)."""
        if self.active and self.parallel == "ddp" and not last:
            with net.no_sync():  # type: ignore[operator]
                yield
        else:
            yield

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        """``clip_grad_norm_`` over all ranks' gradients; returns the global norm as a plain tensor."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # ---- logging and stopping
    def sync_window(self, loss_sum: Tensor, grad_norm_sum: Tensor, stop_requested: bool) -> None:
        """At a logging step: average the window's loss and grad-norm sums over the ranks (in place)
        and agree on a Ctrl-C seen by any rank (read back with ``stopping``). One all-reduce."""
        if not self.active:
            self._stop = stop_requested
            return
        packed = torch.stack([loss_sum.float(), grad_norm_sum.float(), torch.tensor(float(stop_requested), device=loss_sum.device)])
        dist.all_reduce(packed)
        loss_sum.copy_(packed[0] / self.world_size)
        grad_norm_sum.copy_(packed[1] / self.world_size)
        self._stop = bool(packed[2].item() > 0)

    def stopping(self, stop_requested: bool) -> bool:
        """Whether to stop for a Ctrl-C: at once in one process; with several, what all ranks agreed
        on at the last logging step (so they stop at the same step)."""
        return stop_requested if not self.active else self._stop

    def first_bad_step(self, first_bad: Tensor) -> int:
        """The earliest step with a non-finite loss on any rank (-1: none)."""
        if not self.active:
            return int(first_bad.item())
        none = torch.iinfo(torch.long).max
        value = torch.where(first_bad < 0, torch.full_like(first_bad, none), first_bad).clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        bad = int(value.item())
        return -1 if bad == none else bad

    def full_model(self, ema_model: nn.Module) -> Optional[nn.Module]:
        """The EMA network for grids and evaluation on rank 0 (``None`` on the other ranks, which
        skip that work). Under FSDP every rank must call this: the weights are gathered."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(ema_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not self.is_main:
                return None
            assert self._gather_target is not None
            self._gather_target.load_state_dict(full)
            return self._gather_target.to(self.device).eval()
        return ema_model if self.is_main else None

    # ---- checkpoints
    def gather_adapter_state(
        self, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> Optional[tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]]:
        """FSDP2 LoRA run: ``(model state, EMA state, optimiser state)`` gathered onto rank 0's CPU
        (``None`` on the other ranks; every rank must call this), the optimiser numbered as one
        process numbers it (``_optimizer_state_by_index``), so the checkpoint is the one-process
        layout. The model's frozen base is left out (``ignore_frozen_params``); the EMA copy has no
        trainable parameters to tell the adapters by, so it is gathered whole, base included: a
        checkpoint-time all-gather of one model's weights."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        trained = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model_state = get_model_state_dict(model, options=trained)  # the adapters (and trained copies)
        ema_state = get_model_state_dict(ema_model, options=full)
        optim_state = get_optimizer_state_dict(model, optimizer, options=full)
        if not self.is_main:
            return None
        return model_state, ema_state, _optimizer_state_by_index(model, optimizer, optim_state)

    def save_checkpoint(
        self,
        run_dir: Path,
        step: int,
        model: nn.Module,
        ema: EMA,
        optimizer: torch.optim.Optimizer,
        cfg: Config,
        training_state: Callable[[], dict[str, Any]],
        extra_files: Optional[dict[str, bytes]] = None,
    ) -> Path:
        """Write step ``step`` (rank 0; FSDP: every rank its shards, rank 0 the rest; ``extra_files``
        as ``save_checkpoint``) and return its path on every rank once it is complete on disk (a barrier)."""
        final = Path(run_dir) / "checkpoints" / step_dir_name(step)
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            staged = self.broadcast(staging_dir(run_dir, step) if self.is_main else None)
            shards = {
                "model": get_model_state_dict(model),
                "ema": get_model_state_dict(ema.model),
                "optimizer": get_optimizer_state_dict(model, optimizer),
            }
            dcp.save(shards, checkpoint_id=str(Path(staged) / SHARDED_DIR))
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(model, options=full)  # rank 0 gets the tensors
            ema_state = get_model_state_dict(ema.model, options=full)
            if self.is_main:
                state = {k: v for k, v in training_state().items() if k != "optimizer"}  # in sharded/
                save_checkpoint(run_dir, step, model_state, ema_state, cfg, state, staged=Path(staged), extra_files=extra_files)
        elif self.is_main:
            save_checkpoint(run_dir, step, model.state_dict(), ema.model.state_dict(), cfg, training_state(),
                            extra_files=extra_files)
        self.barrier()
        return final
