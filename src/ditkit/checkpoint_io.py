"""Reading checkpoints: the on-disk names, finding the newest complete checkpoint, and loading its
config, weights and training state. No writing and no training code, so sampling and serving can
read checkpoints without importing ``ditkit.train`` (docs/architecture.md: serve/ never imports
train/). Saving lives in ``ditkit.train.checkpoint``, which re-exports everything here.

Layout::

    RUN/config.json                          the full typed config of the run
    RUN/checkpoints/step_0001000/
        model.safetensors                    raw weights (fp32)
        ema.safetensors                      EMA weights, the ones sampling uses by default
        config.json                          the config again: a checkpoint alone rebuilds its model
        state.pt                             optimiser, step, EMA counter, data position, RNG states;
                                             loads with torch.load(weights_only=True)
        sharded/                             FSDP runs only: model, EMA and optimiser shards written
                                             by every rank through torch.distributed.checkpoint
                                             (state.pt then has no optimiser; see train/distributed.py)
        adapter/, ema_adapter/               LoRA runs (train.lora_rank > 0) only, in place of the two
                                             model files: adapter_model.safetensors + adapter_config.json
                                             (ditkit.adapters); the base is the run's train.init_from

A step directory is complete when it holds ``config.json`` and ``model.safetensors`` (a LoRA run:
``adapter/adapter_model.safetensors``); saves publish a directory by an atomic rename, so readers
never see a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors

from ditkit.config import Config, ConfigError

__all__ = [
    "MODEL_FILE",
    "EMA_FILE",
    "CONFIG_FILE",
    "STATE_FILE",
    "CheckpointError",
    "step_dir_name",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_checkpoint_config",
    "load_weights",
    "load_training_state",
    "checkpoint_facts",
    "weights_sha256",
    "Checkpoint",
    "ADAPTER_DIR",
    "EMA_ADAPTER_DIR",
    "is_adapter_checkpoint",
]

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
ADAPTER_DIR = "adapter"  # LoRA runs: the trained adapter (ditkit.adapters.save_adapter)
EMA_ADAPTER_DIR = "ema_adapter"  # and its EMA, what sampling uses
_ADAPTER_WEIGHTS = "adapter_model.safetensors"  # ditkit.adapters.ADAPTER_WEIGHTS (this room cannot import it)
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint is missing or unreadable; the message names the path and what to pass instead."""


def step_dir_name(step: int) -> str:
    """``step_0001000`` for step 1000: the name of a step's checkpoint directory."""
    return f"step_{step:07d}"


# ---- finding -------------------------------------------------------------------------------------


def is_adapter_checkpoint(path: str | Path) -> bool:
    """Whether a step directory is a LoRA run's: adapters in place of the model files."""
    return (Path(path) / ADAPTER_DIR / _ADAPTER_WEIGHTS).is_file() and not (Path(path) / MODEL_FILE).is_file()


def _is_complete(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and ((path / MODEL_FILE).is_file() or is_adapter_checkpoint(path))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete ``step_*`` directories of a run, oldest first. A step whose directory is missing
    but whose previous copy was moved aside (``.old-step_*``, a crash while re-saving that step)
    is listed under that copy."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and _is_complete(p):
            found[int(m.group(1))] = p
    for p in root.glob(".old-step_*"):
        m = _STEP_DIR.match(p.name[len(".old-"):].rsplit("-", 1)[0])
        if m and int(m.group(1)) not in found and _is_complete(p):
            found[int(m.group(1))] = p
    return [found[k] for k in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint directory, a run directory (its newest checkpoint)
    or a run's ``checkpoints/`` folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--ckpt {path}: no such file or folder; pass a run directory or a checkpoint directory")
    if path.is_file() and path.name in (MODEL_FILE, EMA_FILE, CONFIG_FILE, STATE_FILE):
        path = path.parent
    if _is_complete(path) and path.is_dir():
        return path
    run = path.parent if path.name == "checkpoints" else path
    latest = latest_checkpoint(run)
    if latest is None:
        raise CheckpointError(
            f"no checkpoint under {path}: pass a run directory that holds checkpoints/step_XXXXXXX/ "
            "(train with ditkit train first) or such a step directory"
        )
    return latest


# ---- reading -------------------------------------------------------------------------------------


def load_checkpoint_config(ckpt: str | Path) -> Config:
    """The ``Config`` saved with a checkpoint (directory from ``resolve_checkpoint``)."""
    path = Path(ckpt) / CONFIG_FILE
    try:
        return Config.from_json(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None


def weights_in(ckpt: str | Path, which: str = "ema") -> str:
    """The weights a checkpoint really holds for ``which``: ``"ema"`` when asked for and present,
    else ``"model"`` (imported checkpoints may have only raw weights); metadata reports this value."""
    ema = EMA_FILE if not is_adapter_checkpoint(ckpt) else f"{EMA_ADAPTER_DIR}/{_ADAPTER_WEIGHTS}"
    return "ema" if which == "ema" and (Path(ckpt) / ema).is_file() else "model"


def _weights_file(ckpt: Path, which: str) -> Path:
    """The file holding ``which`` weights: a model file, or a LoRA run's adapter file."""
    ema = weights_in(ckpt, which) == "ema"
    if is_adapter_checkpoint(ckpt):
        return ckpt / (EMA_ADAPTER_DIR if ema else ADAPTER_DIR) / _ADAPTER_WEIGHTS
    return ckpt / (EMA_FILE if ema else MODEL_FILE)


def load_weights(ckpt: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """State dict from ``ema.safetensors`` (``which="ema"``) or ``model.safetensors``. A checkpoint
    without EMA weights (e.g. imported) gives the raw weights (``weights_in`` says which)."""
    ckpt = Path(ckpt)
    if is_adapter_checkpoint(ckpt):
        raise CheckpointError(
            f"{ckpt} is a LoRA run's checkpoint (adapters only, base: its train.init_from): load it with "
            "ditkit.load / ditkit sample, or write a full run with ditkit lora merge"
        )
    path = ckpt / (EMA_FILE if weights_in(ckpt, which) == "ema" else MODEL_FILE)
    try:
        return load_safetensors(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read weights {path}: {err}") from None


def checkpoint_facts(ckpt: str | Path) -> dict[str, Optional[int]]:
    """``{"step", "epoch", "num_params"}`` of a checkpoint from the header of ``model.safetensors``
    (no tensor is loaded); step falls back to the directory name, epoch to None."""
    ckpt = Path(ckpt)
    with safe_open(str(_weights_file(ckpt, "model")), framework="pt") as f:  # a LoRA run: the adapter's
        meta = f.metadata() or {}
        num_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    m = _STEP_DIR.match(ckpt.name)
    step = meta.get("step") or (m.group(1) if m else "")
    return {
        "step": int(step) if step else None,
        "epoch": int(meta["epoch"]) if meta.get("epoch") else None,
        "num_params": num_params,
    }


def load_training_state(ckpt: str | Path) -> dict[str, Any]:
    """``state.pt`` loaded with ``weights_only=True`` on the CPU."""
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no {STATE_FILE}: it holds weights only and cannot be resumed")
    return torch.load(path, map_location="cpu", weights_only=True)


def weights_sha256(ckpt: str | Path, which: str = "ema") -> str:
    """SHA-256 hex digest of the weights file sampling uses (identifies a checkpoint in metadata)."""
    path = _weights_file(Path(ckpt), which)  # a LoRA run: the adapter file
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Checkpoint:
    """A checkpoint opened once: its directory, config and header facts, read a single time and
    passed along (pipelines, CLI, server) instead of re-resolving the path.

    ``Checkpoint.open(path)`` takes a ``step_*`` directory, a run directory (its newest checkpoint)
    or a run's ``checkpoints/`` folder; raises ``CheckpointError`` naming the path otherwise.
    """

    def __init__(self, directory: Path, config: Config) -> None:
        self.dir = directory
        self.config = config
        self._facts: Optional[dict[str, Optional[int]]] = None

    @classmethod
    def open(cls, path: "str | Path | Checkpoint") -> "Checkpoint":
        if isinstance(path, Checkpoint):
            return path
        directory = resolve_checkpoint(path)
        return cls(directory, load_checkpoint_config(directory))

    @property
    def run_dir(self) -> Path:
        """The run directory (``RUN`` of ``RUN/checkpoints/step_*``), or the checkpoint's own folder."""
        return self.dir.parent.parent if self.dir.parent.name == "checkpoints" else self.dir

    @property
    def facts(self) -> dict[str, Optional[int]]:
        if self._facts is None:
            self._facts = checkpoint_facts(self.dir)
        return self._facts

    @property
    def step(self) -> Optional[int]:
        return self.facts["step"]

    def weights(self, which: str = "ema") -> tuple[dict[str, torch.Tensor], str]:
        """``(state dict, "ema" or "model")``: what was loaded, named honestly."""
        return load_weights(self.dir, which), weights_in(self.dir, which)

    def sha256(self, which: str = "ema") -> str:
        return weights_sha256(self.dir, which)
