"""Checkpoints: the on-disk format, atomic saving, finding and loading.

Layout (docs/architecture.md)::

    RUN/config.json                          the full typed config of the run
    RUN/checkpoints/step_0001000/
        model.safetensors                    raw weights (fp32)
        ema.safetensors                      EMA weights, the ones sampling uses by default
        config.json                          the config again: a checkpoint alone rebuilds its model
        state.pt                             optimiser, step, EMA counter, data position, RNG states;
                                             loads with torch.load(weights_only=True)

A save writes every file into ``checkpoints/.tmp-step_XXXXXXX-PID/``, fsyncs each file and the
directory, then renames the directory into place (atomic on POSIX) and fsyncs the parent. A crash
at any point leaves either the old set of checkpoints or the old set plus the complete new one;
readers never see a half-written ``step_*`` directory. Leftover temp directories are removed by
the next save.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes

from ditkit.config import Config, ConfigError

__all__ = [
    "MODEL_FILE",
    "EMA_FILE",
    "CONFIG_FILE",
    "STATE_FILE",
    "CheckpointError",
    "step_dir_name",
    "save_checkpoint",
    "atomic_write_bytes",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_checkpoint_config",
    "load_weights",
    "load_training_state",
    "checkpoint_facts",
    "prune_checkpoints",
    "weights_sha256",
]

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint is missing or unreadable; the message names the path and what to pass instead."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# ---- writing -------------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    """Write bytes and fsync them (the data is on disk before the rename that publishes it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` through a temp file in the same directory + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _tensors_for_file(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone(): safetensors refuses tensors that share storage; contiguous CPU copies never do.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    config: Config,
    training_state: dict[str, Any],
) -> Path:
    """Atomically write ``RUN/checkpoints/step_XXXXXXX/`` (see module doc) and return its path.

    ``training_state`` must hold only what ``torch.load(weights_only=True)`` accepts (tensors,
    numbers, strings, lists, tuples, dicts). An existing checkpoint of the same step is replaced.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    old = root / f".old-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # step and epoch also in the safetensors header: readers get them without loading state.pt
    meta = {"format": "pt", "step": str(step), "epoch": str(training_state.get("epoch", ""))}
    try:
        _write_file(tmp / MODEL_FILE, safetensors_bytes(_tensors_for_file(model_state), metadata=meta))
        _write_file(tmp / EMA_FILE, safetensors_bytes(_tensors_for_file(ema_state), metadata=meta))
        _write_file(tmp / CONFIG_FILE, config.to_json().encode())
        buffer = io.BytesIO()
        torch.save(training_state, buffer)
        _write_file(tmp / STATE_FILE, buffer.getvalue())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside, publish, then delete it
            os.rename(final, old)  # a crash from here to the next rename: readers use .old-* (see below)
        os.rename(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old.exists() and not final.exists():
            os.rename(old, final)  # put the previous checkpoint of this step back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and stale temp directories; return the
    deleted checkpoint paths."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    for stale in root.glob(".tmp-*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    kept = list_checkpoints(run_dir)
    doomed = kept[:-keep_last] if keep_last > 0 else []
    for path in doomed:
        shutil.rmtree(path)
    for stale in root.glob(".old-*"):  # moved-aside copies that are not the newest copy of a step
        if stale not in kept:
            shutil.rmtree(stale, ignore_errors=True)
    return doomed


# ---- finding -------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


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


def load_weights(ckpt: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """State dict from ``ema.safetensors`` (``which="ema"``) or ``model.safetensors``. A checkpoint
    without EMA weights (e.g. imported) falls back to the raw weights."""
    ckpt = Path(ckpt)
    path = ckpt / (EMA_FILE if which == "ema" else MODEL_FILE)
    if which == "ema" and not path.is_file():
        path = ckpt / MODEL_FILE
    try:
        return load_safetensors(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read weights {path}: {err}") from None


def checkpoint_facts(ckpt: str | Path) -> dict[str, Optional[int]]:
    """``{"step", "epoch", "num_params"}`` of a checkpoint from the header of ``model.safetensors``
    (no tensor is loaded); step falls back to the directory name, epoch to None."""
    ckpt = Path(ckpt)
    with safe_open(str(ckpt / MODEL_FILE), framework="pt") as f:
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
    ckpt = Path(ckpt)
    path = ckpt / (EMA_FILE if which == "ema" else MODEL_FILE)
    if not path.is_file():
        path = ckpt / MODEL_FILE
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
