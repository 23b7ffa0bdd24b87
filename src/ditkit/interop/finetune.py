"""Fine-tuning initialisation: start a new DiT from pretrained weights of another shape.

``init_from(model, source)`` copies weights from a ditkit run or checkpoint directory, an official
DiT checkpoint (.pt / .pth / .safetensors) or a diffusers folder into `model` (freshly built for
the user's data). Allowed differences, each recorded in the returned provenance:

* class count: the label table is rebuilt; the rows the user maps (``class_map``: new -> old) are
  copied, other rows are drawn N(0, 0.02) like a fresh DiT (Peebles & Xie 2023, sec. 3 init), and
  the null row (guidance) stays last. An unconditional target folds the source's null row into
  the timestep MLP's output bias, so it starts as the source's unconditional model.
* image size: ``pos_embed`` is the target's own sin-cos table for its grid.
* learned sigma: dropping it keeps the mean channels of the final layer; adding it starts the
  variance channels at zero (adaLN-Zero style).

Everything else (depth, width, patch, channels) must match; a mismatch names the keys.
Optimiser state is not touched: the caller starts it fresh.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import load_file

from ditkit.models.dit import DiT
from ditkit.interop.common import IMPORTED_CONFIG, InteropError, check_state_dict, infer_dit_kwargs, strip_prefixes
from ditkit.interop.diffusers_format import read_diffusers_folder
from ditkit.interop.official import read_official_checkpoint

__all__ = ["init_from", "read_source_state_dict"]

ClassMap = Union[Mapping[int, int], Sequence[Optional[int]]]


def _latest_checkpoint(run_dir: Path) -> Path:
    steps = [p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    complete = [p for p in steps if any((p / f).is_file() for f in ("ema.safetensors", "model.safetensors"))]
    if not complete:
        raise InteropError(f"{run_dir} has no checkpoints/step_*/ with model weights")
    return max(complete, key=lambda p: int(p.name.split("_")[1]))


def _source_freq_shift(folder: Path) -> Optional[float]:
    """timestep_freq_shift recorded next to ditkit weights (config.json of a run, or model_config.json)."""
    for name in (IMPORTED_CONFIG, "config.json"):
        f = folder / name
        if f.is_file():
            data = json.loads(f.read_text())
            if isinstance(data.get("dit_kwargs"), dict):
                return float(data["dit_kwargs"].get("timestep_freq_shift", 0.0))
            model = data.get("model")
            if isinstance(model, dict) and "name" in model:  # a full ditkit Config: None = the DiT default, 0
                return float(model.get("timestep_freq_shift") or 0.0)
    return None


def read_source_state_dict(source: str | Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Official-key state dict and a provenance record for any supported source.

    Sources: a ditkit run directory (latest ``checkpoints/step_*``), a ditkit checkpoint directory
    (``ema.safetensors`` / ``model.safetensors``), an official checkpoint file, a diffusers
    DiTTransformer2DModel or DiTPipeline folder. EMA weights are preferred when `use_ema`.
    The record holds ``source``, ``kind``, ``weights`` and ``timestep_freq_shift`` (None: unknown).
    """
    path = Path(source)
    if path.is_file():
        ckpt = read_official_checkpoint(path, use_ema=use_ema)
        kind = "official" if ckpt.kind == "training" or path.suffix != ".safetensors" else "state_dict"
        if any(k.startswith("transformer_blocks.") for k in ckpt.state_dict):
            raise InteropError(f"{path} holds diffusers-named weights: point --init-from at its folder (with config.json)")
        shift = 0.0 if kind == "official" else None  # a bare .safetensors may be ditkit's, convention unknown
        return ckpt.state_dict, {"source": str(path), "kind": kind, "weights": ckpt.weights, "timestep_freq_shift": shift}
    if not path.is_dir():
        raise InteropError(f"--init-from {source}: no such file or directory")
    if (path / "model_index.json").is_file() or (
        (path / "config.json").is_file() and "_class_name" in json.loads((path / "config.json").read_text())
    ):
        state, _, _ = read_diffusers_folder(path)
        return state, {"source": str(path), "kind": "diffusers", "weights": "transformer", "timestep_freq_shift": 1.0}
    folder = _latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
    names = ("ema.safetensors", "model.safetensors") if use_ema else ("model.safetensors", "ema.safetensors")
    for name in names:
        if (folder / name).is_file():
            state = strip_prefixes(load_file(str(folder / name)))
            shift = _source_freq_shift(folder)
            if shift is None and folder != path:
                shift = _source_freq_shift(path)
            record = {"source": str(folder), "kind": "ditkit", "weights": name.split(".")[0], "timestep_freq_shift": shift}
            return state, record
    raise InteropError(
        f"--init-from {source}: not a ditkit run/checkpoint directory (no ema.safetensors or model.safetensors), "
        "an official .pt file, or a diffusers folder"
    )


def _row_map(class_map: Optional[ClassMap], n_new: int, n_old: int) -> list[Optional[int]]:
    """For each new class, the source row it copies (None: fresh)."""
    if class_map is None:
        if n_new == n_old:
            return list(range(n_new))
        warnings.warn(
            f"the source has {n_old} classes and the new model {n_new}; no class_map given, so every class "
            "row starts fresh (only the null row is kept). Pass class_map={new: old} to keep rows",
            stacklevel=3,
        )
        return [None] * n_new
    if isinstance(class_map, Mapping):
        rows: list[Optional[int]] = [None] * n_new
        for new, old in class_map.items():
            new, old = int(new), (None if old is None else int(old))
            if not 0 <= new < n_new:
                raise InteropError(f"class_map: new class {new} is outside 0..{n_new - 1}")
            rows[new] = old
    else:
        rows = [None if old is None else int(old) for old in class_map]
        if len(rows) != n_new:
            raise InteropError(f"class_map lists {len(rows)} classes but the new model has {n_new}")
    bad = [old for old in rows if old is not None and not 0 <= old < n_old]
    if bad:
        raise InteropError(f"class_map: source classes {bad[:5]} are outside 0..{n_old - 1}")
    return rows


def _final_layer(weight: torch.Tensor, patch: int, old_out: int, new_out: int) -> torch.Tensor:
    """Keep the first min(old, new) output channels of the final Linear (rows laid out (p, p, C)).
    Works for the weight (rows, D) and the bias (rows,); new channels are zero."""
    rest = weight.shape[1:]
    w = weight.reshape(patch * patch, old_out, *rest)
    out = w.new_zeros(patch * patch, new_out, *rest)
    keep = min(old_out, new_out)
    out[:, :keep] = w[:, :keep]
    return out.reshape(patch * patch * new_out, *rest)


def _same_architecture(
    model: torch.nn.Module, state: dict[str, torch.Tensor], record: dict[str, Any], class_map: Optional[ClassMap]
) -> dict[str, Any]:
    """Every model family but the class DiT (prompt DiTs, Latte, TextDiT, AudioDiT): the source must be
    a ditkit run of the same architecture (same keys and shapes), copied as it is; nothing is
    resized or remapped, so a class map is refused."""
    name = type(model).__name__
    if class_map is not None:
        raise InteropError(f"--class-map is for class DiT models: a {name} starts from a run of its own architecture, "
                           "label table included")
    if record["kind"] != "ditkit":
        raise InteropError(f"--init-from {record['source']}: a {name} starts only from a ditkit run or checkpoint folder "
                           f"of the same model (point --init-from at the folder, not a weights file)")
    check_state_dict(model, state, what=f"--init-from source {record['source']}",
                     hint=f"a {name} starts only from a run of the same model and data sizes (model.name, "
                          "image size, channels, vocabulary)")
    model.load_state_dict(state, strict=True)
    return {"init_from": record["source"], "kind": record["kind"], "weights": record["weights"],
            "label_rows_copied": 0, "label_rows_fresh": 0, "class_map": None, "pos_embed": "copied",
            "notes": [f"{name}: same architecture, every tensor copied"]}


@torch.no_grad()
def init_from(
    model: torch.nn.Module,
    source: str | Path,
    class_map: Optional[ClassMap] = None,
    *,
    use_ema: bool = True,
    generator: Optional[torch.Generator] = None,
) -> dict[str, Any]:
    """Load pretrained weights from `source` into the freshly built `model` (in place).

    A class ``DiT`` may differ from the source as the module docstring lists; any other model
    family (prompt DiTs, Latte, TextDiT, AudioDiT) takes a ditkit run of exactly its architecture.

    `class_map`: new class -> source class, as a dict or a list (entry None: fresh row). Default:
    identity when the class counts agree, else all rows fresh. `generator` seeds the fresh rows.
    Returns a JSON-ready provenance record to store with the run: ``init_from`` (path), ``kind``,
    ``weights``, ``label_rows_copied``, ``label_rows_fresh``, ``pos_embed``, ``notes``.
    """
    state, record = read_source_state_dict(source, use_ema=use_ema)
    if not isinstance(model, DiT):
        return _same_architecture(model, state, record, class_map)
    target = model.state_dict()
    info = infer_dit_kwargs(state)
    notes: list[str] = []
    new_state = dict(state)

    # -- positional table: the target's own (sin-cos for its grid, or zeros with RoPE) --------
    # It is a fixed function of the architecture, so the target keeps its own.
    same = "pos_embed" in state and state["pos_embed"].shape == target["pos_embed"].shape
    if same and torch.allclose(state["pos_embed"].float(), target["pos_embed"].float(), atol=1e-5):
        pos = "copied"
    else:
        pos = f"recomputed for a {model.grid_size}x{model.grid_size} grid" + (" (RoPE: zeros)" if model.use_rope else "")
    new_state["pos_embed"] = target["pos_embed"].clone()

    # -- label table ------------------------------------------------------------------------
    table_key = "y_embedder.embedding_table.weight"
    copied = fresh = 0
    if table_key in state and table_key in target:
        old = state[table_key]
        n_old, n_new = old.shape[0] - 1, model.num_classes
        rows = _row_map(class_map, n_new, n_old)
        table = torch.empty_like(target[table_key])
        table.normal_(0.0, 0.02, generator=generator)  # fresh rows: as DiT.initialize_weights
        for new, src in enumerate(rows):
            if src is not None:
                table[new] = old[src]
        table[n_new] = old[n_old]  # the null class stays last
        copied = sum(r is not None for r in rows)
        fresh = n_new - copied
        new_state[table_key] = table
    elif table_key in state:  # unconditional target: its c = t_emb must equal the source's t_emb + null
        null = state[table_key][-1]
        bias = "t_embedder.mlp.2.bias"
        new_state[bias] = state[bias] + null.to(state[bias].dtype)
        del new_state[table_key]
        notes.append("unconditional target: the source's null-class embedding was folded into t_embedder.mlp.2.bias")
    elif table_key in target:
        table = torch.empty_like(target[table_key]).normal_(0.0, 0.02, generator=generator)
        new_state[table_key] = table
        fresh = model.num_classes
        notes.append("the source is unconditional: every label row (and the null row) starts fresh")

    # -- learned sigma --------------------------------------------------------------------
    p = model.patch_size
    for leaf in ("weight", "bias"):
        key = f"final_layer.linear.{leaf}"
        if key in state and state[key].shape[0] != target[key].shape[0]:
            old_out = state[key].shape[0] // (p * p)
            if {old_out, model.out_channels} == {model.in_channels, 2 * model.in_channels}:
                new_state[key] = _final_layer(state[key], p, old_out, model.out_channels)
                if leaf == "weight":
                    notes.append(
                        f"final layer: {old_out} -> {model.out_channels} output channels "
                        + ("(variance channels dropped)" if old_out > model.out_channels else "(variance channels start at zero)")
                    )

    # -- timestep convention -------------------------------------------------------------------
    shift = record.get("timestep_freq_shift")
    if shift is not None and float(shift) != float(model.t_embedder.freq_shift):
        notes.append(
            f"the source was trained with timestep_freq_shift={shift:g}, the new model uses "
            f"{model.t_embedder.freq_shift:g}: build the model with timestep_freq_shift={shift:g} to keep its timestep embedding"
        )
        warnings.warn(notes[-1], stacklevel=2)

    hint = (
        f"--init-from keeps depth, width, patch size and channels; the source looks like "
        f"depth {info['depth']}, hidden size {info['hidden_size']}, patch {info['patch_size']}, "
        f"{info['in_channels']} input channels (preset {info['preset']})"
    )
    check_state_dict(model, new_state, what=f"--init-from source {record['source']}", hint=hint)
    model.load_state_dict(new_state, strict=True)
    return {
        "init_from": record["source"],
        "kind": record["kind"],
        "weights": record["weights"],
        "label_rows_copied": copied,
        "label_rows_fresh": fresh,
        "class_map": None if class_map is None else (
            {str(k): v for k, v in class_map.items()} if isinstance(class_map, Mapping) else list(class_map)
        ),
        "pos_embed": pos,
        "notes": notes,
    }
