"""The diffusers format: ``DiTTransformer2DModel`` folders and ``DiTPipeline`` folders, both ways.

Writing needs no diffusers install (the files are plain JSON + safetensors); the parity tests load
them with diffusers. How diffusers' DiT differs from the official one, and what we do about it:

* Per-block embedders. diffusers keeps a copy of the timestep MLP and the label table in every
  block (``transformer_blocks.i.norm1.emb``); its final layer uses block 0's. Export duplicates
  ours; import checks the copies agree and otherwise warns and uses block 0's (a model trained
  inside diffusers can have drifting copies; ditkit cannot represent them, so outputs differ).
* ``attn.qkv`` is split into ``to_q / to_k / to_v`` (rows [0, D), [D, 2D), [2D, 3D)).
* ``pos_embed`` is not stored: diffusers recomputes the same 2-D sin-cos table (float64 maths).
* Norm eps: the MLP-branch LayerNorm (``norm3``) uses ``config.norm_eps``, default 1e-5; DiT uses
  1e-6 everywhere, so export writes ``norm_eps: 1e-6``. Importing a folder with another eps warns.
* ``out_channels`` is written explicitly (``2 C`` with learned sigma).
* Timestep sinusoid: diffusers divides the frequency exponent by ``half - 1``
  (``downscale_freq_shift=1``), official DiT by ``half``. A ditkit model built with
  ``timestep_freq_shift=1`` (``--set model.timestep_freq_shift=1`` when training) is exact;
  import builds it so by default. Exporting a model trained with the official convention (shift 0,
  ditkit's default) changes every timestep embedding: frequency i changes by a factor
  ``10000 ** (i / (128 * 127))`` (up to 1.075), so at t = 999 the sinusoid arguments move by up
  to 2.9 rad. What that does to samples is measured on trained models in docs/interop.md
  (``LOSSY_SHIFT_MEASURED``); the export refuses it unless ``allow_lossy=True`` (``--allow-lossy``).
* Guidance in ``DiTPipeline``: it passes label 1000 as the null class. A model with another class
  count gets ``pipeline_ditkit.py`` in the export folder: ``DiTkitPipeline``, a ``DiTPipeline``
  whose guidance uses the model's own null row (``num_embeds_ada_norm``); load it with
  ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder + "/pipeline_ditkit.py",
  trust_remote_code=True)`` (the file is 40 lines: read it first).
* With the settings above, export -> diffusers -> import is exact: max abs output difference
  2.4e-7 in fp32 for a random DiT-T (tests/test_interop_diffusers.py holds it under 1e-5).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from ditkit.fileio import atomic_path, write_text
from ditkit.models.dit import DiT, sincos_2d
from ditkit.interop.common import InteropError, check_state_dict, dit_kwargs, infer_dit_kwargs

__all__ = [
    "DIFFUSERS_VERSION",
    "to_diffusers_state_dict",
    "from_diffusers_state_dict",
    "diffusers_config",
    "scheduler_config",
    "export_diffusers",
    "read_diffusers_folder",
    "import_diffusers",
    "LOSSY_SHIFT_MEASURED",
    "lossy_export_reasons",
    "CUSTOM_PIPELINE_FILE",
]

DIFFUSERS_VERSION = "0.42.1"  # the version the parity tests ran against; written into the configs
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
CUSTOM_PIPELINE_FILE = "pipeline_ditkit.py"

# Measured by benchmarks/diffusers_export_shift.py (docs/interop.md): the cost of exporting a model
# trained with timestep_freq_shift=0, quoted by the export's refusal and warning.
LOSSY_SHIFT_MEASURED = (
    "measured on the trained digits main job, DDPM 50 at cfg 1.25, 2 x 500 samples driven by ditkit's sampler: "
    "FD (classifier features) 9.8 -> 11.5 (+18%), recall 0.92 -> 0.89, conditional accuracy 0.91 -> 0.92 "
    "(unchanged); one network call moves by up to 3% of its output; docs/interop.md"
)

# Per-block renames (ditkit / official name -> diffusers name), qkv handled apart.
_BLOCK_RENAMES = {
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
# Embedders held once by ditkit, once per block by diffusers.
_EMBEDDER_RENAMES = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}
_TOP_RENAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}


# ------------------------------------------------------------------------------------------------
# State dicts
# ------------------------------------------------------------------------------------------------


def _check_exportable(model: DiT) -> dict[str, Any]:
    """Raise InteropError for DiT options diffusers' DiTTransformer2DModel cannot express."""
    kw = dit_kwargs(model)
    problems = []
    if kw["pos_embed"] != "sincos":
        problems.append("pos_embed='rope' (diffusers' DiT has only the sin-cos table)")
    if kw["qk_norm"]:
        problems.append("qk_norm=True")
    if kw["norm"] != "layernorm":
        problems.append(f"norm={kw['norm']!r}")
    if kw["mlp"] != "gelu" or kw["mlp_ratio"] != 4.0:
        problems.append(f"mlp={kw['mlp']!r} with mlp_ratio {kw['mlp_ratio']} (diffusers: GELU-tanh, ratio 4)")
    if kw["num_classes"] == 0:
        problems.append("num_classes=0 (DiTTransformer2DModel is always class-conditional)")
    if kw["decoder_depth"]:
        problems.append(f"{kw['decoder_depth']} MaskDiT decoder block(s) (model.decoder_depth; diffusers' DiT has none)")
    if problems:
        raise InteropError(
            "this DiT cannot be written in the diffusers format: " + "; ".join(problems)
            + ". Keep it as a ditkit checkpoint, or train with the official options."
        )
    return kw


def to_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Official-key state dict -> diffusers DiTTransformer2DModel keys (pos_embed dropped,
    embedders copied into each of the `depth` blocks, qkv split into to_q/to_k/to_v)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "pos_embed":
            continue
        stem, _, leaf = key.rpartition(".")
        if stem in _TOP_RENAMES:
            out[f"{_TOP_RENAMES[stem]}.{leaf}"] = value
        elif stem in _EMBEDDER_RENAMES:
            for i in range(depth):
                out[f"transformer_blocks.{i}.{_EMBEDDER_RENAMES[stem]}.{leaf}"] = value
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            rest_stem = rest.rpartition(".")[0]
            prefix = f"transformer_blocks.{index}"
            if rest_stem == "attn.qkv":
                for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                    out[f"{prefix}.attn1.{name}.{leaf}"] = part
            elif rest_stem in _BLOCK_RENAMES:
                out[f"{prefix}.{_BLOCK_RENAMES[rest_stem]}.{leaf}"] = value
            else:
                raise InteropError(f"no diffusers name for {key}")
        else:
            raise InteropError(f"no diffusers name for {key}")
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def from_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers DiTTransformer2DModel keys -> official-key state dict (without pos_embed).

    Block 0's embedder copy is used (it is the one diffusers' final layer uses); copies in other
    blocks that differ from it raise a warning naming the blocks and the largest difference.
    """
    out: dict[str, torch.Tensor] = {}
    inverse_top = {v: k for k, v in _TOP_RENAMES.items()}
    inverse_block = {v: k for k, v in _BLOCK_RENAMES.items()}
    inverse_embed = {v: k for k, v in _EMBEDDER_RENAMES.items()}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    disagree: dict[str, float] = {}
    for key, value in state_dict.items():
        stem, _, leaf = key.rpartition(".")
        if stem in inverse_top:
            out[f"{inverse_top[stem]}.{leaf}"] = value
            continue
        if not key.startswith("transformer_blocks."):
            raise InteropError(f"unexpected key {key!r} in a diffusers DiT state dict")
        _, index, rest = key.split(".", 2)
        rest_stem = rest.rpartition(".")[0]
        if rest_stem in inverse_embed:
            name = f"{inverse_embed[rest_stem]}.{leaf}"
            if index == "0":
                out[name] = value
            else:
                reference = state_dict[f"transformer_blocks.0.{rest}"]
                if not torch.equal(reference, value):
                    diff = (reference.float() - value.float()).abs().max().item()
                    disagree[f"block {index}"] = max(disagree.get(f"block {index}", 0.0), diff)
        elif rest_stem in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
            qkv.setdefault((index, leaf), {})[rest_stem[-1]] = value
        elif rest_stem in inverse_block:
            out[f"blocks.{index}.{inverse_block[rest_stem]}.{leaf}"] = value
        else:
            raise InteropError(f"unexpected key {key!r} in a diffusers DiT state dict")
    for (index, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise InteropError(f"block {index}: attention {leaf} has only {sorted(parts)} of to_q/to_k/to_v")
        out[f"blocks.{index}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if disagree:
        worst = max(disagree.values())
        warnings.warn(
            f"the per-block timestep/label embedders differ from block 0's in {len(disagree)} block(s) "
            f"({', '.join(list(disagree)[:4])}...; max abs difference {worst:.3g}). ditkit keeps one "
            "embedder and uses block 0's (the one diffusers' final layer uses); outputs will differ "
            "from diffusers' for this model",
            stacklevel=2,
        )
    return out


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def diffusers_config(model: DiT) -> dict[str, Any]:
    """The DiTTransformer2DModel config.json for `model` (norm_eps 1e-6, out_channels explicit)."""
    kw = _check_exportable(model)
    return {
        "_class_name": "DiTTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_attention_heads": kw["num_heads"],
        "attention_head_dim": kw["hidden_size"] // kw["num_heads"],
        "in_channels": kw["in_channels"],
        "out_channels": model.out_channels,
        "num_layers": kw["depth"],
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": kw["input_size"],
        "patch_size": kw["patch_size"],
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": kw["num_classes"],
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
    }


def scheduler_config(
    schedule: str = "linear", num_timesteps: int = 1000, prediction: str = "eps", scheduler: str = "DDIMScheduler"
) -> dict[str, Any]:
    """A diffusers scheduler config for a Gaussian ditkit objective.

    linear: betas linear from 1e-4 to 0.02 scaled by 1000 / T (as official DiT / ADM);
    cosine: diffusers' ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021, eq. 17, beta capped at 0.999).
    prediction eps | v | x0 maps to epsilon | v_prediction | sample. No clipping of x0.
    """
    kinds = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
    if prediction not in kinds:
        raise InteropError(f"prediction={prediction!r}: diffusers schedulers take eps, v or x0")
    config: dict[str, Any] = {
        "_class_name": scheduler,
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": num_timesteps,
        "prediction_type": kinds[prediction],
        "clip_sample": False,
    }
    if schedule == "linear":
        scale = 1000 / num_timesteps
        config.update(beta_schedule="linear", beta_start=1e-4 * scale, beta_end=0.02 * scale)
    elif schedule == "cosine":
        config.update(beta_schedule="squaredcos_cap_v2")
    else:
        raise InteropError(f"schedule={schedule!r}: diffusers export knows 'linear' and 'cosine'")
    return config


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def lossy_export_reasons(model: DiT) -> list[str]:
    """What an export of `model` would not carry over exactly (empty: the export is exact)."""
    reasons = []
    if model.t_embedder.freq_shift != 1:
        reasons.append(
            f"it was trained with timestep_freq_shift={model.t_embedder.freq_shift:g} (official DiT, ditkit's default) "
            f"and diffusers always uses 1, so every timestep embedding changes ({LOSSY_SHIFT_MEASURED})"
        )
    return reasons


def _write_transformer(model: DiT, folder: Path, allow_lossy: bool = False) -> None:
    config = diffusers_config(model)
    reasons = lossy_export_reasons(model)
    if reasons:
        message = "the diffusers export of this DiT is not exact: " + "; ".join(reasons) + (
            ". For exact exports train (or fine-tune) with --set model.timestep_freq_shift=1"
        )
        if not allow_lossy:
            raise InteropError(message + "; --allow-lossy exports anyway")
        warnings.warn(message, stacklevel=3)
    table = torch.as_tensor(sincos_2d(model.pos_embed.shape[-1], model.grid_size)).float()
    if not torch.allclose(model.pos_embed.detach().float().cpu()[0], table, atol=1e-5):
        warnings.warn("pos_embed differs from the sin-cos table diffusers recomputes; it is not exported", stacklevel=3)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_diffusers_state_dict(model.state_dict(), depth=len(model.blocks))
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")


# Written next to model_index.json when the class count is not 1000 (DiTPipeline's hard-coded null).
_CUSTOM_PIPELINE_SOURCE = '''"""DiTPipeline for this {num_classes}-class DiT, written by `ditkit export-diffusers`.

diffusers' DiTPipeline guides against label 1000 (ImageNet's null class); this model's null class is
row {num_classes} of its label table. DiTkitPipeline passes that row instead, so guidance works:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(FOLDER, custom_pipeline=FOLDER + "/pipeline_ditkit.py",
                                             trust_remote_code=True)
    images = pipe(class_labels=[0, 1], guidance_scale=4.0, num_inference_steps=25).images

Without it, DiTPipeline.from_pretrained(FOLDER) works with guidance_scale=1 only.
"""

import torch
from diffusers import DiTPipeline


class DiTkitPipeline(DiTPipeline):
    """DiTPipeline whose classifier-free guidance uses the transformer's own null class
    (``transformer.config.num_embeds_ada_norm``) instead of the hard-coded 1000."""

    def __call__(self, *args, **kwargs):
        null_class = int(self.transformer.config.num_embeds_ada_norm)
        guidance_scale = kwargs.get("guidance_scale", args[1] if len(args) > 1 else 4.0)

        def use_own_null(module, call_args, call_kwargs):
            labels = call_kwargs.get("class_labels")
            if guidance_scale > 1 and labels is not None:
                # DiTPipeline stacks [labels, nulls]: replace the second half by this model's null row
                half = labels.shape[0] // 2
                labels = torch.cat([labels[:half], torch.full_like(labels[half:], null_class)])
                call_kwargs = {**call_kwargs, "class_labels": labels}
            return call_args, call_kwargs

        handle = self.transformer.register_forward_pre_hook(use_own_null, with_kwargs=True)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            handle.remove()
'''


def _copy_vae(vae: str | Path, folder: Path) -> None:
    src = Path(vae)
    if (src / "model_index.json").is_file() and (src / "vae").is_dir():
        src = src / "vae"
    config = src / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("_class_name") not in (None, "AutoencoderKL"):
        raise InteropError(f"--vae {vae}: expected a diffusers AutoencoderKL folder (config.json + weights)")
    folder.mkdir(parents=True, exist_ok=True)
    copied = 0
    for f in src.iterdir():
        if f.is_file() and (f.name == "config.json" or f.name.startswith("diffusion_pytorch_model")):
            shutil.copy2(f, folder / f.name)
            copied += f.name != "config.json"
    if not copied:
        raise InteropError(f"--vae {vae}: no diffusion_pytorch_model.* weights next to its config.json")


def export_diffusers(
    model: DiT,
    out_dir: str | Path,
    *,
    vae: str | Path | None = None,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    schedule: str = "linear",
    num_timesteps: int = 1000,
    prediction: str = "eps",
    scheduler: str = "DDIMScheduler",
    allow_lossy: bool = False,
) -> Path:
    """Write `model` in the diffusers format.

    Without `vae`: a DiTTransformer2DModel folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``) for ``DiTTransformer2DModel.from_pretrained``.
    With `vae` (a local AutoencoderKL folder): a DiTPipeline folder (``model_index.json`` with
    ``id2label``, ``transformer/``, ``vae/`` copied, ``scheduler/scheduler_config.json`` from
    `schedule`, `num_timesteps` and `prediction`) for ``DiTPipeline.from_pretrained``.
    `id2label` maps class index -> name (a list of names works too; default: the index as text).
    A model with other than 1000 classes also gets ``pipeline_ditkit.py`` (``DiTkitPipeline``:
    guidance with this model's null class; see the module docstring).
    Raises InteropError when the export would not be exact (``lossy_export_reasons``) unless
    `allow_lossy`, which warns instead. Returns `out_dir`.
    """
    out = Path(out_dir)
    if vae is None:
        _write_transformer(model, out, allow_lossy)
        return out
    _write_transformer(model, out / "transformer", allow_lossy)
    if model.num_classes != 1000:
        write_text(out / CUSTOM_PIPELINE_FILE, _CUSTOM_PIPELINE_SOURCE.replace("{num_classes}", str(model.num_classes)))
    _copy_vae(vae, out / "vae")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    write_text(out / "scheduler" / "scheduler_config.json",
               json.dumps(scheduler_config(schedule, num_timesteps, prediction, scheduler), indent=2) + "\n")
    if id2label is None:
        labels = {str(i): str(i) for i in range(model.num_classes)}
    elif isinstance(id2label, Mapping):
        labels = {str(int(k)): str(v) for k, v in id2label.items()}
    else:
        labels = {str(i): str(name) for i, name in enumerate(id2label)}
    index = {
        "_class_name": "DiTPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "id2label": labels,
        "scheduler": ["diffusers", scheduler],
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    write_text(out / "model_index.json", json.dumps(index, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return load_file(str(single))
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    legacy = folder / "diffusion_pytorch_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise InteropError(f"{folder}: no {WEIGHTS_NAME} (or its sharded index, or a .bin) found")


def read_diffusers_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a DiTTransformer2DModel folder, or a DiTPipeline folder (its ``transformer/``).

    Returns (official-key state dict without pos_embed, transformer config, pipeline info with
    ``id2label`` (dict int -> str or None), ``vae`` (Path or None), ``scheduler`` (dict or None)).
    """
    root = Path(path)
    pipeline: dict[str, Any] = {"id2label": None, "vae": None, "scheduler": None}
    folder = root
    if (root / "model_index.json").is_file():
        index = json.loads((root / "model_index.json").read_text())
        folder = root / "transformer"
        labels = index.get("id2label")
        pipeline["id2label"] = {int(k): v for k, v in labels.items()} if labels else None
        pipeline["vae"] = root / "vae" if (root / "vae" / "config.json").is_file() else None
        sched = root / "scheduler" / "scheduler_config.json"
        pipeline["scheduler"] = json.loads(sched.read_text()) if sched.is_file() else None
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InteropError(f"{path}: not a diffusers DiT folder (no config.json or model_index.json)")
    config = json.loads(config_path.read_text())
    if config.get("_class_name") not in _TRANSFORMER_CLASSES:
        raise InteropError(f"{config_path}: _class_name {config.get('_class_name')!r} is not a DiT transformer")
    expected = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
    }
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise InteropError(f"{config_path}: {key}={config[key]!r} is not supported (DiT needs {value!r})")
    if config.get("patch_size") is None:
        raise InteropError(f"{config_path}: no patch_size: this is not a patch-based DiT transformer")
    state = from_diffusers_state_dict(_load_weights(folder))
    return state, config, pipeline


def import_diffusers(
    path: str | Path,
    timestep_freq_shift: float = 1.0,
    class_dropout_prob: float = 0.1,
    **overrides: Any,
) -> DiT:
    """Build a ditkit DiT from a diffusers DiTTransformer2DModel or DiTPipeline folder (eval mode).

    `timestep_freq_shift` 1 reproduces diffusers' outputs exactly; pass 0 for weights that were
    converted from the official release (e.g. facebook/DiT-XL-2-256), to run them the official way.
    diffusers' MLP-branch LayerNorm eps (``norm_eps``, default 1e-5) is not a ditkit option: a
    folder with an eps other than 1e-6 loads with a warning (1e-5 vs 1e-6: ~6e-7 relative output change).
    """
    state, config, _ = read_diffusers_folder(path)
    eps = config.get("norm_eps", 1e-5)
    if eps != 1e-6:
        warnings.warn(
            f"{path}: norm_eps={eps:g} in the MLP-branch LayerNorm; ditkit uses 1e-6 (as official DiT), "
            "so outputs differ from diffusers' by ~1e-6 relative (measured 6e-7 on a random DiT-T)",
            stacklevel=2,
        )
    heads, head_dim = config.get("num_attention_heads", 16), config.get("attention_head_dim", 72)
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise InteropError(f"{path}: out_channels {out_channels} is neither in_channels nor 2 x in_channels")
    kwargs: dict[str, Any] = dict(
        input_size=config.get("sample_size", 32),
        patch_size=config["patch_size"],
        in_channels=in_channels,
        hidden_size=heads * head_dim,
        depth=config.get("num_layers", 28),
        num_heads=heads,
        num_classes=config.get("num_embeds_ada_norm", 1000),
        learn_sigma=out_channels == 2 * in_channels,
        class_dropout_prob=class_dropout_prob,
        timestep_freq_shift=timestep_freq_shift,
    )
    kwargs.update(overrides)
    model = DiT(**kwargs)
    state["pos_embed"] = model.pos_embed.detach().clone()
    info = infer_dit_kwargs(state)
    check_state_dict(
        model, state, what=f"diffusers folder {path}",
        hint=f"the weights look like depth {info['depth']}, hidden size {info['hidden_size']}, "
        f"patch {info['patch_size']}, {info['num_classes']} classes: check config.json",
    )
    model.load_state_dict(state, strict=True)
    return model.eval()
