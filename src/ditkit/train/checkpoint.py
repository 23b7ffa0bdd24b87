"""Checkpoints: the on-disk format, atomic saving, finding and loading.

The layout is described once, in ``ditkit.checkpoint_io`` (the read side, re-exported here).

A save writes every file into ``checkpoints/.tmp-step_XXXXXXX-PID/``, fsyncs each file and the
directory, then renames the directory into place (atomic on POSIX) and fsyncs the parent. A crash
at any point leaves either the old set of checkpoints or the old set plus the complete new one;
readers never see a half-written ``step_*`` directory. Leftover temp directories are removed by
the next save.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save as safetensors_bytes

# The read side lives in the neutral ditkit.checkpoint_io (sampling and serving use it without
# importing ditkit.train); re-exported here so ditkit.train.checkpoint stays the one-stop module.
from ditkit.checkpoint_io import (
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_facts,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_config,
    load_training_state,
    load_weights,
    resolve_checkpoint,
    step_dir_name,
    weights_sha256,
)
from ditkit.config import Config
from ditkit.fileio import fsync_dir, write_bytes

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
    "SHARDED_DIR",
    "staging_dir",
    "weights_sha256",
]


# ---- writing -------------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    """Write bytes and fsync them (the data is on disk before the rename that publishes it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` through a temp file in the same directory + fsync + rename (``ditkit.fileio``)."""
    write_bytes(path, data, fsync=True)


def _tensors_for_file(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone(): safetensors refuses tensors that share storage; contiguous CPU copies never do.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


SHARDED_DIR = "sharded"  # torch.distributed.checkpoint directory of an FSDP checkpoint


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """A fresh, empty temp directory where ``save_checkpoint(..., staged=...)`` of this process
    will assemble step ``step``; other ranks write their shards into it before it is published."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    config: Config,
    training_state: dict[str, Any],
    staged: Optional[Path] = None,
    extra_files: Optional[dict[str, bytes]] = None,
) -> Path:
    """Atomically write ``RUN/checkpoints/step_XXXXXXX/`` (see module doc) and return its path.

    ``training_state`` must hold only what ``torch.load(weights_only=True)`` accepts (tensors,
    numbers, strings, lists, tuples, dicts). An existing checkpoint of the same step is replaced.
    ``staged``: the directory from ``staging_dir`` that already holds files written by others
    (the FSDP shards); it is published together with the files written here. ``extra_files``:
    ``{name: bytes}`` published with the rest (the tokenizer beside ``config.json``).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    old = root / f".old-{name}-{os.getpid()}"
    if staged is not None:
        if Path(staged) != tmp:
            raise ValueError(f"staged={staged}: pass the directory staging_dir(run_dir, {step}) made in this process")
    else:
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
        for name, data in (extra_files or {}).items():
            _write_file(tmp / name, data)
        fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside, publish, then delete it
            os.rename(final, old)  # a crash from here to the next rename: readers use .old-* (see below)
        os.rename(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old.exists() and not final.exists():
            os.rename(old, final)  # put the previous checkpoint of this step back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep: Optional[Path] = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (and ``keep``, e.g. the best-validation
    one) and stale temp directories; return the deleted checkpoint paths."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    for stale in root.glob(".tmp-*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    kept = list_checkpoints(run_dir)
    doomed = [p for p in (kept[:-keep_last] if keep_last > 0 else []) if keep is None or p.name != Path(keep).name]
    for path in doomed:
        shutil.rmtree(path)
    for stale in root.glob(".old-*"):  # moved-aside copies that are not the newest copy of a step
        if stale not in kept:
            shutil.rmtree(stale, ignore_errors=True)
    return doomed
