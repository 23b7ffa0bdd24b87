"""LoRA and DoRA adapters on ditkit transformers, through ``peft`` (no hand-written LoRA layers).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) adds to a frozen
Linear ``W (out, in)`` the product ``(alpha / r) * B A`` with ``A (r, in)``, ``B (out, r)``, ``B = 0`` at
the start, so a new adapter leaves the outputs unchanged. DoRA (Liu et al. 2024, eq. 5) also learns
a per-output-row magnitude. Both are peft's ``LoraConfig`` (``use_dora``).

The model keeps its type. Adapters are injected with ``peft.inject_adapter_in_model``, which swaps
each targeted ``nn.Linear`` for a peft ``lora.Linear`` wrapping it in place, so ``model(x, t, y)``, the
objectives, samplers, EMA and ``torch.compile`` see the same ``DiT`` / ``TextDiT`` as before. What
changes is the state dict: a wrapped layer's weight is ``blocks.0.attn.qkv.base_layer.weight`` and its
adapter ``blocks.0.attn.qkv.lora_A.<name>.weight``. So an adapted model is saved with
``save_adapter`` (the adapter only) and ``base_state_dict`` (the base under its plain keys), and
``merge_adapters`` / ``unload_adapters`` give back a plain model with the usual keys.

Targets are named presets resolved to module names by pattern (one table, ``LORA_TARGET_PRESETS``;
the model families share block names: ``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1``, ...), or regular
expressions matched in full against module names. A preset that matches no Linear layer of the model
is an error, so ``cross_attn`` on the class-conditional DiT says so instead of training nothing.

On disk an adapter is a folder (``ADAPTER_WEIGHTS`` + ``ADAPTER_CONFIG``; the JSON is also in the
safetensors header, so the file alone loads). Keys are peft's for an injected model
(``blocks.0.attn.qkv.lora_A.weight``). The config records rank, alpha, targets, variant, the base
model's name and ``base_sha256``: SHA-256 over the base state dict (see ``base_sha256``). Loading an
adapter checks layer shapes and the hash against the model it goes into.

Beside the low-rank matrices an adapter may train chosen small modules whole (``train_modules``,
``--lora-train-modules``), with peft's own ``modules_to_save``: peft wraps each such module in a
``ModulesToSaveWrapper`` holding the frozen original (``original_module``) and one trainable copy per
adapter (``modules_to_save.<name>``). The preset ``labels`` is the class-label embedding table
(``y_embedder.embedding_table``: a new class's row was never trained in the base, and LoRA alone
cannot move it). The copy is saved in the adapter file under the module's own keys
(``y_embedder.embedding_table.weight``, as peft writes it). A copy replaces the module whole: the
adapter's weight (scale) does not interpolate it, so it is used at any weight != 0 and the original at
weight 0, and at most one adapter at a weight != 0 may hold a copy of one module (peft runs one copy
per forward); ``merge_adapters`` writes the active copy into the base, ``unload_adapters`` puts the
original back. diffusers' LoRA layout has no place for a whole module: ``export_lora_diffusers``
refuses such an adapter.

The diffusers twin of DiT (``DiTTransformer2DModel``) has its own module names (``attn1.to_q``, ...,
ditkit.interop.diffusers_format); ``export_lora_diffusers`` writes an adapter as diffusers' LoRA file
(``pytorch_lora_weights.safetensors``, keys ``transformer.transformer_blocks.0.attn1.to_q.lora_A.weight``
and the ``lora_adapter_metadata`` header diffusers reads), and ``load_adapter`` reads such a file back.

This module imports no training code (serve/ may use it) and imports peft only when called.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ditkit.errors import ConfigError
from ditkit.fileio import atomic_path, write_text

__all__ = [
    "LORA_TARGET_PRESETS",
    "LORA_TRAIN_MODULE_PRESETS",
    "LORA_VARIANTS",
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "DIFFUSERS_LORA_WEIGHTS",
    "AdapterInfo",
    "apply_lora",
    "resolve_targets",
    "resolve_train_modules",
    "lora_target_presets",
    "adapter_parameters",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "restore_adapter",
    "find_adapter",
    "parse_adapter_spec",
    "adapters_of",
    "set_adapter_scales",
    "unload_adapters",
    "merge_adapters",
    "base_state_dict",
    "base_sha256",
    "cast_base",
    "export_lora_diffusers",
]

# Presets: name -> regular expressions matched in full against module names. The families share
# block names (DiT, TextDiT, Latte, the audio DiT: DiTBlock; CrossDiT adds blocks.N.cross_attn and
# PixArt's shared adaLN-single t_block; MMDiT adds a context stream: attn.context_qkv/context_proj,
# context_mlp, context_adaLN_modulation), so one table serves all of them.
_DENOISER = r"(?:dit\.)?"  # the prompt families (PromptDiT) keep their DiT under ``dit.``
LORA_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    # self-attention (MMDiT: the joint attention of both streams): fused qkv and output projection
    "attn": (_DENOISER + r"blocks\.\d+\.attn\.(context_)?(qkv|proj)",),
    "qkv": (_DENOISER + r"blocks\.\d+\.attn\.(context_)?qkv",),
    "mlp": (_DENOISER + r"blocks\.\d+\.(context_)?mlp\.(fc1|fc2)",),
    # adaLN modulation: per block, the final layer's, CrossDiT's shared adaLN-single
    "adaLN": (_DENOISER + r"blocks\.\d+\.(context_)?adaLN_modulation\.1", _DENOISER + r"final_layer\.adaLN_modulation\.1",
              _DENOISER + r"t_block\.1"),
    "cross_attn": (_DENOISER + r"blocks\.\d+\.cross_attn\.\w+",),  # CrossDiT: query, key/value and output Linears
    "final": (_DENOISER + r"final_layer\.linear",),  # the per-patch output Linear
    # the jointly trained text encoder of the prompt families (PromptDiT.text_encoder): its attention
    "text_attn": (r"text_encoder\.blocks\.\d+\.attn\.(qkv|proj)",),
}
# Whole modules an adapter may train beside its low-rank matrices (peft's modules_to_save): preset ->
# regular expressions matched in full against module names. DiT, Latte, the audio DiT and TextDiT
# keep their class labels in LabelEmbedder.embedding_table (num_classes + 1 rows: the last is the
# null class of guidance); the prompt families (PromptDiT, CrossDiT, MMDiT) have no label table.
LORA_TRAIN_MODULE_PRESETS: dict[str, tuple[str, ...]] = {
    "labels": (r"y_embedder\.embedding_table",),
}
LORA_VARIANTS = ("lora", "dora")
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names
ADAPTER_CONFIG = "adapter_config.json"
DIFFUSERS_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
_FORMAT = "ditkit-adapter"
_FORMAT_VERSION = 1
_META_KEY = "ditkit_adapter_config"  # the config JSON in the safetensors header
_DIFFUSERS_META_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_DIFFUSERS_PREFIX = "transformer"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INFO_ATTR = "ditkit_adapters"  # model attribute: dict adapter name -> AdapterInfo
_HASH_ATTR = "_ditkit_base_sha256"  # model attribute: base hash computed before a cast
_MEMO_ATTR = "_ditkit_base_sha256_memo"  # model attribute: (tensor stamps, digest) of the last hash


def _peft() -> Any:
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is a dependency of the lora feature
        raise ConfigError("LoRA adapters need the peft package: pip install peft") from None
    return peft


def _lora_layer_cls() -> type:
    return _peft().tuners.lora.LoraLayer


def _wrapper_cls() -> type:
    """peft's ``ModulesToSaveWrapper``: a module trained whole, one copy per adapter."""
    _peft()
    from peft.utils import ModulesToSaveWrapper

    return ModulesToSaveWrapper


def _wrappers(model: nn.Module) -> dict[str, Any]:
    """Module name -> the ``ModulesToSaveWrapper`` in ``model`` (empty for a plain model)."""
    if not getattr(model, "peft_config", None):
        return {}
    cls = _wrapper_cls()
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


@dataclass
class AdapterInfo:
    """What ditkit knows about one adapter in a model (and writes into ``adapter_config.json``).

    rank/alpha: the common rank and alpha (``rank_pattern``/``alpha_pattern`` hold per-module
    exceptions, e.g. after importing a diffusers LoRA whose q, k, v factors differ); targets: the
    preset names / patterns asked for; target_modules: the resolved module names; scale: the
    multiplier on ``alpha / rank`` used at inference (1 = as trained; not saved); train_modules: the
    presets / patterns of whole modules asked for (``--lora-train-modules``), modules_to_save: the
    module names they resolved to (peft's field; a trained copy of each is part of the adapter).
    """

    rank: int
    alpha: float
    targets: list[str]
    target_modules: list[str]
    variant: str = "lora"
    dropout: float = 0.0
    base_model: str = ""
    base_sha256: Optional[str] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    scale: float = 1.0
    source: Optional[str] = None
    train_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)

    def lora_config(self) -> Any:
        """The peft ``LoraConfig``; patterns are anchored so ``blocks.1.`` never matches ``blocks.11.``."""
        return _peft().LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            use_dora=self.variant == "dora",
            rank_pattern={_anchored(k): v for k, v in self.rank_pattern.items()},
            alpha_pattern={_anchored(k): v for k, v in self.alpha_pattern.items()},
            # peft matches these by name suffix; resolve_train_modules gives full names, and
            # _inject checks that exactly those modules were wrapped
            modules_to_save=list(self.modules_to_save) or None,
        )

    def to_json(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content: peft's LoraConfig fields plus a ``ditkit`` section."""
        d = asdict(self)
        d.pop("scale"), d.pop("source")
        extra: dict[str, Any] = {}
        if self.modules_to_save:  # omitted when empty: a plain LoRA adapter's config stays as before
            extra["modules_to_save"] = list(self.modules_to_save)
        else:
            d.pop("train_modules"), d.pop("modules_to_save")
        return {
            "peft_type": "LORA",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "lora_dropout": self.dropout,
            "use_dora": self.variant == "dora",
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "bias": "none",
            **extra,
            "ditkit": {"format": _FORMAT, "version": _FORMAT_VERSION, **d},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> "AdapterInfo":
        own = data.get("ditkit")
        if not isinstance(own, Mapping) or own.get("format") != _FORMAT:
            raise ConfigError(f"{where}: not a ditkit adapter config (no 'ditkit' section with format {_FORMAT!r})")
        if int(own.get("version", 0)) > _FORMAT_VERSION:
            raise ConfigError(f"{where}: adapter format version {own['version']} is newer than this ditkit: upgrade ditkit")
        fields = {k: own[k] for k in cls.__dataclass_fields__ if k in own}
        try:
            return cls(**fields)
        except TypeError as err:
            raise ConfigError(f"{where}: incomplete adapter config ({err})") from None


def _anchored(name: str) -> str:
    # peft matches pattern keys with re.match(rf"(.*\.)?({key})$", module); an escaped full name with
    # "^" (peft >= 0.15 treats it as "from the start") names exactly one module.
    return name if name.startswith("^") else "^" + re.escape(name)


# ------------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------------


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Module name -> the Linear layer (a peft wrapper's base layer counts as the Linear)."""
    lora_cls = _lora_layer_cls() if getattr(model, "peft_config", None) else ()
    out: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if ".modules_to_save." in name:  # an adapter's trained copy of a whole module, not the base
            continue
        name = name.replace(".original_module", "")  # a module trained whole: its frozen original
        if lora_cls and isinstance(module, lora_cls):
            base = module.get_base_layer()
            if isinstance(base, nn.Linear):
                out[name] = base
        elif isinstance(module, nn.Linear) and ".base_layer" not in name and ".lora_" not in name:
            out[name] = module
    return out


def _split_targets(targets: str | Sequence[str]) -> list[str]:
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    items = [str(item).strip() for item in items if str(item).strip()]
    if not items:
        raise ConfigError(f"--lora-targets {targets!r} is empty: choose from {', '.join(LORA_TARGET_PRESETS)}")
    return items


def _preset(item: str) -> Optional[tuple[str, ...]]:
    lowered = {k.lower(): v for k, v in LORA_TARGET_PRESETS.items()}
    return lowered.get(item.lower())


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Module names (in model order) of the Linear layers that ``targets`` names.

    ``targets``: "attn,mlp" or a list; each item a preset of ``LORA_TARGET_PRESETS`` (any case) or a
    regular expression matched in full against module names (e.g. ``blocks\\.[0-3]\\.attn\\.qkv``).

    Raises:
        ConfigError: an item matches no Linear layer of the model (naming it and the presets that fit).
    """
    linears = _linear_layers(model)
    chosen: set[str] = set()
    for item in _split_targets(targets):
        patterns = _preset(item) or (item,)
        try:
            hits = {n for n in linears if any(re.fullmatch(p, n) for p in patterns)}
        except re.error as err:
            raise ConfigError(f"--lora-targets '{item}' is neither a preset nor a valid pattern ({err})") from None
        if not hits:
            fits = ", ".join(lora_target_presets(model)) or "(none)"
            kind = "preset" if _preset(item) else "pattern"
            raise ConfigError(
                f"--lora-targets {kind} '{item}' matches no Linear layer of this {type(model).__name__}: "
                f"choose from {fits}, or a pattern over its layer names (e.g. blocks\\.0\\.attn\\.qkv)"
            )
        chosen |= hits
    return [n for n in linears if n in chosen]


def lora_target_presets(model: nn.Module) -> dict[str, list[str]]:
    """The presets that match at least one Linear layer of ``model`` -> the module names they give."""
    linears = _linear_layers(model)
    out = {}
    for name, patterns in LORA_TARGET_PRESETS.items():
        hits = [n for n in linears if any(re.fullmatch(p, n) for p in patterns)]
        if hits:
            out[name] = hits
    return out


def _module_names(model: nn.Module) -> dict[str, nn.Module]:
    """Base module name -> module, peft's additions left out: a wrapped module under its own name
    (its original), no adapter copies, LoRA factors or base_layer aliases."""
    wrapper_cls = _wrapper_cls() if getattr(model, "peft_config", None) else ()
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(part in name for part in (".modules_to_save", ".lora_", ".base_layer", ".original_module")):
            continue
        out[name] = module.original_module if wrapper_cls and isinstance(module, wrapper_cls) else module
    return out


def resolve_train_modules(model: nn.Module, items: str | Sequence[str]) -> list[str]:
    """Module names (in model order) of the modules an adapter trains whole (peft's ``modules_to_save``).

    ``items``: "labels" or a list; each a preset of ``LORA_TRAIN_MODULE_PRESETS`` (any case) or a
    regular expression matched in full against module names (e.g. ``final_layer\\.linear``).
    "" or [] gives [] (LoRA matrices only). Two chosen modules may not be nested.

    Raises:
        ConfigError: an item matches no module with weights (the preset ``labels`` on a model without a
            class-label table, e.g. PromptDiT), is a bad pattern, or two chosen modules are nested.
    """
    wanted = _split_items(items)
    if not wanted:
        return []
    modules = _module_names(model)
    presets = {k.lower(): v for k, v in LORA_TRAIN_MODULE_PRESETS.items()}
    kind = type(model).__name__
    chosen: set[str] = set()
    for item in wanted:
        patterns = presets.get(item.lower(), (item,))
        try:
            hits = {n for n in modules if n and any(re.fullmatch(p, n) for p in patterns)}
        except re.error as err:
            raise ConfigError(f"--lora-train-modules '{item}' is neither a preset nor a valid pattern ({err})") from None
        hits = {n for n in hits if any(True for _ in modules[n].parameters())}
        if not hits and item.lower() == "labels":
            raise ConfigError(
                f"--lora-train-modules labels: this {kind} has no class-label embedding (y_embedder.embedding_table; "
                "prompt models are conditioned on text): drop --lora-train-modules"
            )
        if not hits:
            raise ConfigError(
                f"--lora-train-modules '{item}' matches no module with weights of this {kind}: use the preset "
                f"{', '.join(LORA_TRAIN_MODULE_PRESETS)} or a pattern over its module names (e.g. final_layer\\.linear)"
            )
        chosen |= hits
    for name in chosen:
        inner = next((o for o in chosen if o.startswith(name + ".")), None)
        if inner is not None:
            raise ConfigError(f"--lora-train-modules names {name} and {inner} inside it: name the module once")
    return [n for n in modules if n in chosen]


def _split_items(items: str | Sequence[str]) -> list[str]:
    """"attn, mlp" or ["attn", "mlp"] -> ["attn", "mlp"] (blanks dropped)."""
    raw = items.split(",") if isinstance(items, str) else list(items)
    return [str(i).strip() for i in raw if str(i).strip()]


def _nested(a: str, b: str) -> bool:
    """``a`` and ``b`` name the same module or one holds the other (dotted module names)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _check_overlaps(model: nn.Module, info: AdapterInfo) -> None:
    """A module is trained either whole or with LoRA: the new adapter's whole modules may not be,
    hold or sit in a LoRA layer (its own or another adapter's), nor its LoRA layers in another
    adapter's whole module (peft cannot wrap one in the other)."""
    lora_cls = _lora_layer_cls() if getattr(model, "peft_config", None) else ()
    lora = set(info.target_modules) | {n for n, m in model.named_modules() if lora_cls and isinstance(m, lora_cls)}
    for whole in info.modules_to_save:
        hit = next((n for n in sorted(lora) if _nested(whole, n)), None)
        if hit is not None:
            raise ConfigError(
                f"--lora-train-modules: module {whole} overlaps LoRA layer {hit}: train a module either whole "
                "or with LoRA (drop it from --lora-targets or from --lora-train-modules)"
            )
    for target in info.target_modules:
        hit = next((n for n in _wrappers(model) if _nested(target, n)), None)
        if hit is not None:
            raise ConfigError(
                f"LoRA layer {target} is inside module {hit}, which a loaded adapter trains whole "
                "(--lora-train-modules): unload that adapter first"
            )


# ------------------------------------------------------------------------------------------------
# The base: hash, plain state dict, dtype
# ------------------------------------------------------------------------------------------------


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its plain keys (adapter tensors left out,
    ``.base_layer.`` removed, a module trained whole by an adapter as its frozen original): what
    ``model.state_dict()`` was before any adapter was injected."""
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key or ".modules_to_save." in key:  # adapters, and adapters' copies of whole modules
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return out


def base_sha256(model: nn.Module) -> str:
    """SHA-256 hex digest of the base weights: for each key of ``base_state_dict`` in sorted order,
    the key, the shape and the float32 bytes. The same weights give the same digest whether they
    came from ``model.safetensors``, an import or memory. A base cast with ``cast_base`` (or
    ``apply_lora(base_dtype=...)``) keeps the digest of its weights before the cast."""
    cached = getattr(model, _HASH_ATTR, None)
    if cached is not None:
        return cached
    state = base_state_dict(model)
    # Hashing DiT-XL/2 takes ~6 s on one core: remember the digest for these exact tensors (any
    # in-place write, load_state_dict included, bumps a tensor's version counter).
    stamp = tuple((k, v.data_ptr(), v._version, v.dtype) for k, v in sorted(state.items()))
    memo = model.__dict__.get(_MEMO_ATTR)
    if memo is not None and memo[0] == stamp:
        return memo[1]
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    model.__dict__[_MEMO_ATTR] = (stamp, digest.hexdigest())
    return digest.hexdigest()


def cast_base(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the frozen base weights to ``dtype`` (e.g. bf16 to halve their memory), adapters kept in
    float32. The base hash is computed first and remembered. Run the model under ``torch.autocast``
    afterwards (the trainer's bf16 precision does): float32 inputs do not mix with a bf16 Linear.
    Adapters' trained copies of whole modules (``modules_to_save``) stay in float32 too."""
    setattr(model, _HASH_ATTR, base_sha256(model))
    for name, param in model.named_parameters():
        if ".lora_" not in name and ".modules_to_save." not in name and param.is_floating_point():
            param.data = param.data.to(dtype)
    return model


def _describe(model: nn.Module) -> str:
    """A short name of the architecture: "DiT(depth 4, hidden 64, patch 4, input 16, 10 classes)"."""
    blocks = getattr(model, "blocks", None)
    parts = []
    if blocks is not None:
        parts.append(f"depth {len(blocks)}")
    linears = _linear_layers(model)
    qkv = next((m for n, m in linears.items() if n.endswith("attn.qkv")), None)
    if qkv is not None:
        parts.append(f"hidden {qkv.in_features}")
    for attr, label in (("patch_size", "patch"), ("input_size", "input"), ("vocab_size", "vocab")):
        if getattr(model, attr, None) is not None:
            parts.append(f"{label} {getattr(model, attr)}")
    if getattr(model, "num_classes", None):
        parts.append(f"{model.num_classes} classes")
    return f"{type(model).__name__}({', '.join(parts)})"


# ------------------------------------------------------------------------------------------------
# Injecting adapters for training
# ------------------------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("lora_"):
        raise ConfigError(f"adapter name {name!r}: use letters, digits and underscores (not starting with lora_)")
    if hasattr(nn.ModuleDict, name):  # peft keeps adapters in ModuleDicts: "half", "train", "to" clash
        raise ConfigError(f"adapter name {name!r} is taken by torch (nn.Module.{name}): pick another, e.g. {name}_lora")
    return name


def _check_rank(linears: Mapping[str, nn.Linear], modules: Iterable[str], rank: int, what: str) -> None:
    for name in modules:
        layer = linears[name]
        width = min(layer.in_features, layer.out_features)
        if rank > width:
            raise ConfigError(
                f"--lora-rank {rank} is larger than layer {name} ({layer.in_features} -> {layer.out_features}, "
                f"width {width}) of {what}: use a rank <= {width} or leave that layer out of --lora-targets"
            )


def adapters_of(model: nn.Module) -> dict[str, AdapterInfo]:
    """The adapters injected in ``model`` (name -> AdapterInfo); empty for a plain model."""
    return getattr(model, _INFO_ATTR, None) or {}


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: Optional[float] = None,
    targets: str | Sequence[str] = "attn,mlp",
    dropout: float = 0.0,
    variant: str = "lora",
    *,
    name: str = "default",
    base_dtype: Optional[torch.dtype] = None,
    base_model: Optional[str] = None,
    train_modules: str | Sequence[str] = "",
) -> nn.Module:
    """Inject a trainable LoRA (or DoRA) adapter into ``model`` in place and freeze everything else.

    Args:
        model: a ditkit transformer (DiT, TextDiT, ...); it keeps its type and forward signature.
        rank: r, the inner dimension of ``B A``; at most the width ``min(in, out)`` of every target.
        alpha: scaling numerator, ``scale = alpha / r`` (default: ``rank``, i.e. scale 1).
        targets: presets / patterns, see ``resolve_targets`` (default self-attention and MLP).
        dropout: dropout on the adapter's input (peft ``lora_dropout``).
        variant: "lora" or "dora" (weight-decomposed, Liu et al. 2024).
        name: the adapter's name (several adapters may live in one model).
        base_dtype: cast the frozen base to this dtype (e.g. ``torch.bfloat16``), see ``cast_base``.
        base_model: a name of the base recorded in the adapter (default: the architecture described).
        train_modules: whole modules the adapter also trains, a trainable copy each (peft's
            ``modules_to_save``; see ``resolve_train_modules``): "labels" is the class-label table.
            Default "": LoRA matrices only.

    Returns the same ``model``; only the new adapter's parameters (and its copies of ``train_modules``)
    have ``requires_grad``. The adapter starts at zero (peft: ``B = 0``; DoRA magnitude = the base
    rows' norms; a copy equals its original), so outputs are unchanged.

    Raises:
        ConfigError: bad rank / alpha / dropout / variant / name, a target matching no layer, a rank
            larger than a targeted layer's width, a name already in use, a train module matching
            nothing (``labels`` on a model without a label table) or overlapping a LoRA layer.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"--lora-rank {rank!r} must be a positive integer (e.g. 16)")
    alpha = float(rank if alpha is None else _number(alpha, "--lora-alpha"))
    if alpha <= 0:
        raise ConfigError(f"--lora-alpha {alpha:g} must be positive (default: the rank)")
    dropout = _number(dropout, "--lora-dropout")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"--lora-dropout {dropout:g} must be in [0, 1)")
    if variant not in LORA_VARIANTS:
        raise ConfigError(f"--lora-variant {variant!r}: choose one of {', '.join(LORA_VARIANTS)}")
    _check_name(name)
    infos = dict(adapters_of(model))
    if name in infos:
        raise ConfigError(f"an adapter named {name!r} is already in this model: pick another name")
    modules = resolve_targets(model, targets)
    _check_rank(_linear_layers(model), modules, rank, _describe(model))
    whole = resolve_train_modules(model, train_modules)
    digest = base_sha256(model)  # before any cast: the hash of the weights as loaded
    info = AdapterInfo(
        rank=rank, alpha=alpha, targets=_split_targets(targets), target_modules=modules, variant=variant,
        dropout=dropout, base_model=base_model or _describe(model), base_sha256=digest,
        train_modules=_split_items(train_modules), modules_to_save=whole,
    )
    _check_overlaps(model, info)
    _check_one_copy_active(model, name, info)
    model.requires_grad_(False)
    _inject(model, info, name)
    infos[name] = info
    setattr(model, _INFO_ATTR, infos)
    _activate(model, trainable=name)
    if base_dtype is not None:
        cast_base(model, base_dtype)
    return model


def _inject(model: nn.Module, info: AdapterInfo, name: str) -> None:
    peft = _peft()
    with warnings.catch_warnings():  # peft warns that a model without a HF config has no model_type
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(info.lora_config(), model, adapter_name=name)
    # peft picks modules_to_save by name suffix: check it wrapped exactly the modules resolved
    wrapped = sorted(n for n, w in _wrappers(model).items() if name in w.modules_to_save)
    if wrapped != sorted(info.modules_to_save):
        raise ConfigError(f"peft wrapped {wrapped} for adapter {name!r}, not {sorted(info.modules_to_save)}: "
                          "name the modules of --lora-train-modules in full")


def _copy_owners(infos: Mapping[str, AdapterInfo]) -> dict[str, list[str]]:
    """Module trained whole -> the adapters at a weight != 0 that hold a copy of it."""
    owners: dict[str, list[str]] = {}
    for name, info in infos.items():
        if info.scale != 0:
            for module in info.modules_to_save:
                owners.setdefault(module, []).append(name)
    return owners


def _check_one_copy_active(model: nn.Module, name: str, info: AdapterInfo) -> None:
    """Refuse to make a second adapter at a weight != 0 hold a copy of the same whole module: a copy
    replaces the module (peft runs one per forward), so two cannot add up as LoRA updates do."""
    infos = {**adapters_of(model), name: info}
    for module, names in _copy_owners(infos).items():
        if len(names) > 1:
            raise ConfigError(
                f"adapters {' and '.join(repr(n) for n in names)} both train {module} whole (--lora-train-modules): "
                "stack at most one of them at a weight != 0 (give the others weight 0)"
            )


def _activate(model: nn.Module, trainable: Optional[str] = None) -> None:
    """Make every adapter in ``adapters_of(model)`` active with its scale; only ``trainable`` (if any)
    requires grad, the base and the other adapters are frozen. A whole-trained module runs the copy
    of the one adapter at a weight != 0 that holds one (else its original)."""
    infos = adapters_of(model)
    names = list(infos)
    lora_cls = _lora_layer_cls()
    owners = _copy_owners(infos)
    for module in model.modules():
        if isinstance(module, lora_cls):
            present = [n for n in names if n in module.lora_A]
            module.set_adapter(present, inference_mode=True)  # active, all frozen
            for n in present:
                module.set_scale(n, infos[n].scale)
            if trainable in present:
                module.set_requires_grad(trainable, requires_grad=True)
    for module_name, wrapper in _wrappers(model).items():
        active = [n for n in owners.get(module_name, []) if n in wrapper.modules_to_save]
        assert len(active) <= 1, f"{module_name}: {active} (checked by _check_one_copy_active)"
        wrapper.set_adapter(active, inference_mode=True)
        for n, copy in wrapper.modules_to_save.items():
            copy.requires_grad_(n == trainable and n in active)


def _adapter_info(model: nn.Module, name: str) -> AdapterInfo:
    """Adapter ``name`` of ``model``; a ConfigError naming the adapters it has when there is none."""
    info = adapters_of(model).get(name)
    if info is None:
        raise ConfigError(f"no adapter named {name!r} in this model (have: {', '.join(adapters_of(model)) or 'none'})")
    return info


def adapter_parameters(model: nn.Module, name: Optional[str] = None) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` (default: all trainable ones), in model order: what the
    optimiser gets. The base has none. An adapter's copies of whole modules count."""
    if name is None:
        return [p for p in model.parameters() if p.requires_grad]
    return [p for n, p in model.named_parameters()
            if (".lora_" in n and f".{name}." in n + ".") or f".modules_to_save.{name}." in n]


def adapter_state_dict(
    model: nn.Module, name: str = "default", state_dict: Optional[Mapping[str, torch.Tensor]] = None
) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under peft's keys without the adapter name
    (``blocks.0.attn.qkv.lora_A.weight``; a copy of a whole module under the module's own keys,
    ``y_embedder.embedding_table.weight``), detached CPU copies. ``state_dict``: take the tensors
    from this full state dict of ``model`` instead of ``model.state_dict()`` (an FSDP2-sharded
    model's weights gathered with ``get_model_state_dict(..., full_state_dict=True)``)."""
    _adapter_info(model, name)
    state = _peft().get_peft_model_state_dict(model, state_dict=None if state_dict is None else dict(state_dict),
                                              adapter_name=name)
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], name: str = "default") -> None:
    """Copy ``state`` (from ``adapter_state_dict``) into adapter ``name``; a missing or unexpected
    adapter key is a ConfigError (e.g. resuming with other --lora-targets)."""
    _adapter_info(model, name)
    expected = set(_peft().get_peft_model_state_dict(model, adapter_name=name))  # the keys; no copies
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"adapter weights do not fit adapter {name!r}: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "use the same --lora-rank/--lora-targets as the run that wrote them"
        )
    targets = {key: _adapter_tensor(model, key, name) for key in state}
    for key, value in state.items():
        if targets[key].shape != value.shape:  # a DTensor's shape is the whole tensor's
            raise ConfigError(f"adapter tensor {key}: shape {tuple(value.shape)} does not fit {tuple(targets[key].shape)}")
    if any(_is_dtensor(t) for t in targets.values()):
        # FSDP2-sharded (every rank calls this with the whole tensors): each rank keeps its shard.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
        full = {names[id(targets[key])]: value for key, value in state.items()}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with torch.no_grad():
        for key, value in state.items():
            targets[key].copy_(value)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def _adapter_tensor(model: nn.Module, key: str, name: str) -> torch.Tensor:
    # "blocks.0.attn.qkv.lora_A.weight" -> parameter "blocks.0.attn.qkv.lora_A.<name>.weight";
    # DoRA's "...lora_magnitude_vector" -> "...lora_magnitude_vector.<name>.weight";
    # a whole module's "y_embedder.embedding_table.weight" -> "...embedding_table.modules_to_save.<name>.weight".
    for module in adapters_of(model)[name].modules_to_save:
        if key.startswith(module + "."):
            full = f"{module}.modules_to_save.{name}.{key[len(module) + 1:]}"
            try:
                return model.get_parameter(full)
            except AttributeError:
                return model.get_buffer(full)
    stem, _, leaf = key.rpartition(".")
    full = f"{key}.{name}.weight" if key.endswith("lora_magnitude_vector") else f"{stem}.{name}.{leaf}"
    return model.get_parameter(full)


# ------------------------------------------------------------------------------------------------
# Save / load / stack / unload / merge
# ------------------------------------------------------------------------------------------------


def save_adapter(
    model: nn.Module, folder: str | Path, name: str = "default", state_dict: Optional[Mapping[str, torch.Tensor]] = None
) -> Path:
    """Write adapter ``name`` of ``model`` to ``folder``: ``adapter_model.safetensors`` (the adapter
    tensors, and the config JSON in the header) and ``adapter_config.json``. Returns ``folder``.
    ``state_dict``: the model's full state dict to take the tensors from (see ``adapter_state_dict``)."""
    from safetensors.torch import save_file

    info = _adapter_info(model, name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = json.dumps(info.to_json(), indent=2) + "\n"
    with atomic_path(folder / ADAPTER_WEIGHTS) as tmp:
        save_file(adapter_state_dict(model, name, state_dict), str(tmp), metadata={"format": "pt", _META_KEY: config})
    write_text(folder / ADAPTER_CONFIG, config)
    return folder


def find_adapter(path: str | Path) -> Path:
    """The adapter file for ``path``: a ``.safetensors`` file; an adapter folder; a checkpoint folder
    holding ``ema_adapter/`` or ``adapter/`` (EMA preferred, as sampling uses EMA weights); or a run
    folder (its newest ``checkpoints/step_*``). Raises ConfigError when there is none."""
    p = Path(path)
    if p.is_file():
        return p
    candidates = [p, p / "ema_adapter", p / "adapter"]
    steps = sorted((p / "checkpoints").glob("step_*")) if (p / "checkpoints").is_dir() else []
    if steps:
        candidates += [steps[-1] / "ema_adapter", steps[-1] / "adapter"]
    for folder in candidates:
        for file in (ADAPTER_WEIGHTS, DIFFUSERS_LORA_WEIGHTS):
            if (folder / file).is_file():
                return folder / file
    raise ConfigError(
        f"--lora {path}: no adapter there ({ADAPTER_WEIGHTS} or {DIFFUSERS_LORA_WEIGHTS} in it, in its "
        "ema_adapter/ or adapter/, or in its newest checkpoint): pass an adapter folder, file or LoRA run"
    )


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """``"RUN_A:0.7"`` -> ``("RUN_A", 0.7)``; ``"RUN_A"`` -> ``("RUN_A", 1.0)`` (the ``--lora`` flag).
    A suffix after the last ``:`` that is not a number is a ConfigError unless the whole text is an
    existing path."""
    path, sep, weight = spec.rpartition(":")
    if not sep or Path(spec).exists():
        return spec, 1.0
    return path, _number(weight, f"--lora {spec}: weight")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{what} {value!r} is not a number (e.g. 0.8)")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r} is not a number (e.g. 0.8)") from None
    if not math.isfinite(number):
        raise ConfigError(f"{what} {value!r} must be finite (e.g. 0.8)")
    return number


def _read_adapter(file: Path) -> tuple[Optional[AdapterInfo], dict[str, torch.Tensor]]:
    """(config, tensors under ditkit module names) from a ditkit adapter file, or (None, raw tensors)
    from a diffusers LoRA file (``_from_diffusers`` converts those; it needs the model)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(file))
    except Exception as err:  # safetensors raises its own error types
        raise ConfigError(f"--lora {file}: cannot read adapter weights ({err})") from None
    config_file = file.parent / ADAPTER_CONFIG
    if _META_KEY in meta:
        info = AdapterInfo.from_json(json.loads(meta[_META_KEY]), str(file))
    elif config_file.is_file() and file.name == ADAPTER_WEIGHTS:
        info = AdapterInfo.from_json(json.loads(config_file.read_text()), str(config_file))
    elif any(k.startswith((f"{_DIFFUSERS_PREFIX}.", "transformer_blocks.")) for k in tensors):
        return None, tensors
    else:
        raise ConfigError(f"--lora {file}: neither a ditkit adapter nor a diffusers transformer LoRA file")
    info.source = str(file)
    return info, tensors


def load_adapter(
    model: nn.Module,
    path: str | Path,
    scale: float = 1.0,
    name: Optional[str] = None,
    *,
    strict_base: bool = True,
    trainable: bool = False,
) -> str:
    """Load an adapter (see ``find_adapter`` for what ``path`` may be) into ``model`` and activate it
    with weight ``scale``; adapters already loaded stay active, so calls stack (outputs add
    ``scale_i * alpha_i / r_i * B_i A_i`` per layer). An adapter's copy of a whole module
    (``--lora-train-modules``) replaces that module at any weight != 0. Returns the adapter's name.

    Args:
        name: default: the run / folder name the path gives (``runs/style_a`` -> ``style_a``; a bare
            file: its stem), made an identifier.
        strict_base: a different ``base_sha256`` than the model's is an error; False only warns.
        trainable: leave the adapter's parameters trainable (continuing to train it).

    Raises:
        ConfigError: ``scale`` not a number; a name in use; the adapter names layers the model does not
            have or has other shapes ("trained on <base> ... this model is <model>"); a different base hash;
            another adapter at a weight != 0 already trains one of its whole modules.
    """
    scale = _number(scale, "--lora weight")
    file = find_adapter(path)
    info, tensors = _read_adapter(file)
    if info is None:  # a diffusers LoRA file
        info, tensors = _from_diffusers(model, tensors, _diffusers_metadata(file), file)
    name = _check_name(name) if name is not None else _default_name(path)
    if name in adapters_of(model):
        raise ConfigError(f"an adapter named {name!r} is already loaded: pass another name")
    _check_fits(model, info, tensors, file, strict_base)
    info.scale = scale
    _check_overlaps(model, info)
    _check_one_copy_active(model, name, info)
    _inject(model, info, name)
    infos = dict(adapters_of(model))
    infos[name] = info
    setattr(model, _INFO_ATTR, infos)
    try:
        load_adapter_state_dict(model, tensors, name)
    except ConfigError:
        unload_adapters(model, [name])  # leave the model as it was
        raise
    _activate(model, trainable=name if trainable else None)
    return name


def restore_adapter(model: nn.Module, path: str | Path, name: str = "default") -> None:
    """Resume: copy the weights saved by ``save_adapter`` into adapter ``name`` that ``apply_lora``
    re-created with the run's settings. The saved rank, alpha, targets and variant must equal the
    live adapter's, and the base must be the one it was trained on (same ``base_sha256``)."""
    file = find_adapter(path)
    saved, tensors = _read_adapter(file)
    live = adapters_of(model).get(name)
    if saved is None or live is None:
        raise ConfigError(f"cannot resume adapter {name!r} from {file}: {'not a ditkit adapter' if live else 'apply_lora first'}")
    for attr in ("rank", "alpha", "target_modules", "variant", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if getattr(saved, attr) != getattr(live, attr):
            raise ConfigError(
                f"{file} was saved with {attr} {getattr(saved, attr)!r} but this run has {getattr(live, attr)!r}: "
                "resume with the same --lora-rank/--lora-alpha/--lora-targets/--lora-variant/--lora-train-modules"
            )
    if saved.base_sha256 != live.base_sha256:
        raise ConfigError(
            f"{file} was trained on base weights sha256 {str(saved.base_sha256)[:12]} but this run's base "
            f"({live.base_model}) has {str(live.base_sha256)[:12]}: resume from the same --init-from"
        )
    load_adapter_state_dict(model, tensors, name)


def _default_name(path: str | Path) -> str:
    """The name a user would call the adapter: the run / folder / file name the path gives
    (``runs/style_a`` -> ``style_a``, not its ``ema_adapter``), made an identifier."""
    p = Path(path).resolve()
    if p.is_file():
        p = p.parent if p.name in (ADAPTER_WEIGHTS, DIFFUSERS_LORA_WEIGHTS) else p.with_suffix("")
    while p.parent != p and (p.name in ("adapter", "ema_adapter", "checkpoints") or p.name.startswith("step_")):
        p = p.parent
    name = re.sub(r"\W", "_", p.name).lstrip("0123456789") or "adapter"
    return name + "_lora" if hasattr(nn.ModuleDict, name) or name.startswith("lora_") else name


def _check_fits(
    model: nn.Module, info: AdapterInfo, tensors: Mapping[str, torch.Tensor], file: Path, strict_base: bool
) -> None:
    """Every target exists with the shapes of the adapter's tensors, and the base hash agrees."""
    linears = _linear_layers(model)
    here = _describe(model)
    trained_on = f"{info.base_model or 'an unnamed base'}"
    for module in info.target_modules:
        layer = linears.get(module)
        if layer is None:
            raise ConfigError(
                f"--lora {file} was trained on {trained_on}, whose layer {module} this model ({here}) does not have: "
                "load it on the base it was trained on"
            )
        a, b = tensors.get(f"{module}.lora_A.weight"), tensors.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise ConfigError(f"--lora {file}: no lora_A/lora_B tensors for layer {module}: the file is incomplete")
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise ConfigError(
                f"--lora {file} was trained on {trained_on} (layer {module}: {a.shape[1]} -> {b.shape[0]}) but this "
                f"model is {here} ({layer.in_features} -> {layer.out_features}): load it on the base it was trained on"
            )
    modules = _module_names(model)
    for module in info.modules_to_save:
        own = modules.get(module)
        if own is None:
            raise ConfigError(
                f"--lora {file} was trained on {trained_on}, whose module {module} (trained whole) this model ({here}) "
                "does not have: load it on the base it was trained on"
            )
        for key, value in own.state_dict().items():
            saved = tensors.get(f"{module}.{key}")
            if saved is None:
                raise ConfigError(f"--lora {file}: no {module}.{key} tensor for module {module}: the file is incomplete")
            if saved.shape != value.shape:
                raise ConfigError(
                    f"--lora {file} was trained on {trained_on} (module {module}.{key}: {tuple(saved.shape)}) but this "
                    f"model is {here} ({tuple(value.shape)}): load it on the base it was trained on"
                )
    if info.base_sha256 is not None:
        mine = base_sha256(model)
        if mine != info.base_sha256:
            message = (
                f"--lora {file} was trained on {trained_on} with base weights sha256 {info.base_sha256[:12]}, "
                f"but this model {here} has weights sha256 {mine[:12]}: load it on the base it was trained on"
            )
            if strict_base:
                raise ConfigError(message + " (or pass strict_base=False)")
            warnings.warn(message, stacklevel=3)


def set_adapter_scales(model: nn.Module, scales: Mapping[str, float]) -> None:
    """Change the weights of loaded adapters (name -> scale; 0 switches one off without unloading)."""
    infos = adapters_of(model)
    new = {}
    for name, scale in scales.items():
        if name not in infos:
            raise ConfigError(f"no adapter named {name!r} is loaded (have: {', '.join(infos) or 'none'})")
        new[name] = _number(scale, f"--lora weight of {name}")
    for module, names in _copy_owners({n: _with_scale(i, new.get(n, i.scale)) for n, i in infos.items()}).items():
        if len(names) > 1:  # checked before any scale changes
            raise ConfigError(
                f"adapters {' and '.join(repr(n) for n in names)} both train {module} whole (--lora-train-modules): "
                "give at most one of them a weight != 0"
            )
    for name, scale in new.items():
        infos[name].scale = scale
    _activate(model)


def _with_scale(info: AdapterInfo, scale: float) -> AdapterInfo:
    return AdapterInfo(**{**{k: getattr(info, k) for k in info.__dataclass_fields__}, "scale": scale})


def _replace_with_base(model: nn.Module, merge: bool) -> None:
    """Replace every peft LoRA layer by its base Linear (merged with its active adapters if ``merge``),
    and every module trained whole by its original (by the active adapter's copy if ``merge``)."""
    lora_cls = _lora_layer_cls()
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, lora_cls)]
    replacements = []
    for name, module in wrapped:
        if merge and module.active_adapters:
            module.merge(adapter_names=list(module.active_adapters))
        replacements.append((name, module.get_base_layer()))
    for name, wrapper in _wrappers(model).items():
        active = [n for n in wrapper.active_adapters if n in wrapper.modules_to_save]
        new = wrapper.modules_to_save[active[0]] if merge and active else wrapper.original_module
        replacements.append((name, new.requires_grad_(False) if merge else new))
    for name, module in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)
    # the base hash survives unloading (a bf16 base keeps its fp32 digest), not merging
    for attr in ("peft_config", _INFO_ATTR) + ((_HASH_ATTR,) if merge else ()):
        if attr in model.__dict__:
            delattr(model, attr)


def unload_adapters(model: nn.Module, names: Optional[Sequence[str]] = None) -> nn.Module:
    """Remove adapters without merging. ``names=None`` removes all and gives back the plain model
    (its layers and state-dict keys as before injection); otherwise only the named ones go."""
    infos = dict(adapters_of(model))
    names = [names] if isinstance(names, str) else names
    if names is None or set(infos) <= set(names):
        unknown = sorted(set(names or ()) - set(infos))
        if unknown:
            raise ConfigError(f"no adapter named {unknown[0]!r} is loaded (have: {', '.join(infos) or 'none'})")
        _replace_with_base(model, merge=False)
        return model
    _peft()
    from peft.functional import delete_adapter

    for name in names:
        if name not in infos:
            raise ConfigError(f"no adapter named {name!r} is loaded (have: {', '.join(infos) or 'none'})")
        # whole modules first (peft's delete would hand the wrapper several active LoRA names and fail)
        for module_name, wrapper in _wrappers(model).items():
            if name in wrapper.modules_to_save:
                wrapper.set_adapter([], inference_mode=True)
                del wrapper.modules_to_save[name]
                wrapper._adapters.discard(name)
                if not wrapper.modules_to_save:  # no adapter trains it any more: the plain module again
                    parent_name, _, child = module_name.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    setattr(parent, child, wrapper.original_module)
        delete_adapter(model, name, prefix="lora_")
        model.peft_config.pop(name, None)
        del infos[name]
    setattr(model, _INFO_ATTR, infos)
    _activate(model)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every active adapter, at its scale, into the base weights and drop the adapter layers, in
    place: the result is a plain model (``model.state_dict()`` with the usual keys, saveable as a
    standard checkpoint) whose outputs equal the adapted model's (up to float rounding).

    Several DoRA adapters, or DoRA with others, cannot be merged exactly (each DoRA magnitude
    normalises the weight it sees): that is a ConfigError; merge one, or sample unmerged.
    """
    infos = adapters_of(model)
    active = [n for n, i in infos.items() if i.scale != 0]
    if len(active) > 1 and any(infos[n].variant == "dora" for n in active):
        raise ConfigError(
            f"cannot merge {len(active)} adapters when one is DoRA ({', '.join(active)}): "
            "merge a single DoRA adapter, or keep them loaded unmerged"
        )
    with torch.no_grad():
        _replace_with_base(model, merge=True)
    return model


# ------------------------------------------------------------------------------------------------
# diffusers layout (DiTTransformer2DModel module names)
# ------------------------------------------------------------------------------------------------


def _diffusers_parts(model: nn.Module) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """ditkit Linear name -> [(diffusers module name, row indices of the ditkit weight it holds)].

    Derived from ``ditkit.interop.diffusers_format.to_diffusers_state_dict`` (the one place that
    knows the renames) by passing it a weight whose rows are their own indices: the fused qkv comes
    back split into to_q/to_k/to_v rows, the embedders once per block."""
    from ditkit.interop.diffusers_format import to_diffusers_state_dict
    from ditkit.models.dit import DiT

    if not isinstance(model, DiT):
        raise ConfigError(f"a {type(model).__name__} has no diffusers twin: only DiT adapters export to diffusers")
    rows = {f"{n}.weight": torch.arange(m.out_features, dtype=torch.float64)[:, None] for n, m in _linear_layers(model).items()}
    out: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for mine in rows:
        for key, value in to_diffusers_state_dict({mine: rows[mine]}, depth=len(model.blocks)).items():
            out.setdefault(mine.removesuffix(".weight"), []).append((key.removesuffix(".weight"), value[:, 0].long()))
    return out


def export_lora_diffusers(model: nn.Module, folder: str | Path, name: str = "default") -> Path:
    """Write adapter ``name`` of a DiT as diffusers' LoRA file ``folder/pytorch_lora_weights.safetensors``:
    keys ``transformer.<diffusers module>.lora_A.weight`` / ``lora_B.weight`` (DoRA: ``lora_magnitude_vector``),
    and the ``lora_adapter_metadata`` header (``transformer.r``, ``transformer.lora_alpha``, ...) from
    which diffusers builds its LoraConfig. The fused qkv adapter becomes three with the same ``A`` and
    ``B`` (and magnitude) split by rows, which is exact. Returns the file."""
    from safetensors.torch import save_file

    info = _adapter_info(model, name)
    if info.modules_to_save:
        raise ConfigError(
            f"adapter {name!r} also trains {', '.join(info.modules_to_save)} whole (--lora-train-modules "
            f"{','.join(info.train_modules)}), which diffusers' LoRA layout cannot hold: export peft's layout "
            "(save_adapter), or merge it (ditkit lora merge) and use the full model"
        )
    parts = _diffusers_parts(model)
    state = adapter_state_dict(model, name)
    lora_cls = _lora_layer_cls()
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for module in info.target_modules:
        layer = model.get_submodule(module)
        if not isinstance(layer, lora_cls):
            raise ConfigError(f"layer {module} of adapter {name!r} is not a LoRA layer any more (merged?): nothing to export")
        a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        magnitude = state.get(f"{module}.lora_magnitude_vector")
        for theirs, rows in parts[module]:
            out[f"{_DIFFUSERS_PREFIX}.{theirs}.lora_A.weight"] = a.clone()
            out[f"{_DIFFUSERS_PREFIX}.{theirs}.lora_B.weight"] = b[rows].clone()
            if magnitude is not None:
                out[f"{_DIFFUSERS_PREFIX}.{theirs}.lora_magnitude_vector"] = magnitude[rows].clone()
            ranks[theirs], alphas[theirs] = int(layer.r[name]), float(layer.lora_alpha[name])
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "lora_dropout": info.dropout,
        "use_dora": info.variant == "dora",
        "rank_pattern": {_anchored(k): v for k, v in ranks.items() if v != rank},
        "alpha_pattern": {_anchored(k): v for k, v in alphas.items() if v != alpha},
    }
    metadata = {f"{_DIFFUSERS_PREFIX}.{k}": v for k, v in config.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / DIFFUSERS_LORA_WEIGHTS
    with atomic_path(file) as tmp:
        save_file(out, str(tmp), metadata={"format": "pt", _DIFFUSERS_META_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
    return file


def _diffusers_metadata(file: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        raw = (f.metadata() or {}).get(_DIFFUSERS_META_KEY)
    if not raw:
        return {}
    meta = json.loads(raw)
    # a pipeline's save_lora_weights prefixes keys with "transformer."; a model's save_lora_adapter does not
    prefixed = {k.removeprefix(f"{_DIFFUSERS_PREFIX}."): v for k, v in meta.items() if k.startswith(f"{_DIFFUSERS_PREFIX}.")}
    return prefixed or meta


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():  # peft's rule: the key matches a dotted suffix of the name
        if re.match(rf"(.*\.)?({key.removeprefix('^') if key.startswith('^') else key})$", module):
            return value
    return default


def _from_diffusers(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], file: Path
) -> tuple[AdapterInfo, dict[str, torch.Tensor]]:
    """A diffusers DiT LoRA state dict -> (AdapterInfo, tensors under ditkit module names).

    Parts of one ditkit layer (to_q/to_k/to_v of qkv; the per-block embedder copies) that share ``A``
    and scale are joined by rows at rank r (exact inverse of the export). Otherwise the factors are
    stacked block-diagonally: ``A = [A_q; A_k; A_v]``, ``B = diag(s_q B_q, s_k B_k, s_v B_v)`` at rank
    ``r_q + r_k + r_v`` and scale 1, which is exact as well. Rows with no part stay zero."""
    parts = _diffusers_parts(model)
    owner = {theirs: (mine, rows) for mine, items in parts.items() for theirs, rows in items}
    found: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        key = key.removeprefix(f"{_DIFFUSERS_PREFIX}.")
        match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)", key)
        if match is None or match.group(1) not in owner:
            raise ConfigError(
                f"--lora {file}: key {key!r} names no layer of this model ({_describe(model)}): "
                "it was trained for another diffusers transformer"
            )
        found.setdefault(match.group(1), {})[match.group(2).split(".")[0]] = value
    if not found:
        raise ConfigError(f"--lora {file}: no transformer LoRA tensors in it")
    default_r = int(meta.get("r", 0)) or None
    use_dora = bool(meta.get("use_dora", False))
    joined: dict[str, torch.Tensor] = {}
    rank_of: dict[str, int] = {}
    alpha_of: dict[str, float] = {}
    linears = _linear_layers(model)
    by_module: dict[str, list[tuple[torch.Tensor, dict[str, torch.Tensor], float]]] = {}
    for theirs, t in found.items():
        if "lora_A" not in t or "lora_B" not in t:
            raise ConfigError(f"--lora {file}: layer {theirs} has no lora_A/lora_B pair")
        r = t["lora_B"].shape[1]
        alpha = float(_pattern_value(meta.get("alpha_pattern", {}), theirs, meta.get("lora_alpha", default_r or r)))
        scaling = alpha / (math.sqrt(r) if meta.get("use_rslora") else r)  # rsLoRA: alpha / sqrt(r)
        mine, rows = owner[theirs]
        if t["lora_B"].shape[0] != len(rows) or t["lora_A"].shape[1] != linears[mine].in_features:
            raise ConfigError(
                f"--lora {file}: layer {theirs} is {t['lora_A'].shape[1]} -> {t['lora_B'].shape[0]} but this model "
                f"({_describe(model)}) has {linears[mine].in_features} -> {len(rows)}: load it on the base it was trained on"
            )
        by_module.setdefault(mine, []).append((rows, t, scaling))
    for mine, items in by_module.items():
        out_features = linears[mine].out_features
        unique: list[tuple[torch.Tensor, dict[str, torch.Tensor], float]] = []
        for rows, t, s in items:  # per-block copies of an embedder cover the same rows: keep one
            same = next((u for u in unique if torch.equal(u[0], rows)), None)
            if same is None:
                unique.append((rows, t, s))
            elif not all(torch.equal(same[1][k], t[k]) for k in t) or same[2] != s:
                raise ConfigError(f"--lora {file}: the per-block copies of {mine}'s adapter differ; ditkit keeps one")
        if use_dora and sum(len(r) for r, _, _ in unique) != out_features:
            raise ConfigError(f"--lora {file}: DoRA adapter covers only part of {mine} (e.g. to_q without to_k/to_v)")
        first_a, first_s = unique[0][1]["lora_A"], unique[0][2]
        shared = all(torch.equal(t["lora_A"], first_a) and s == first_s for _, t, s in unique)
        if shared:
            r = first_a.shape[0]
            a, b = first_a, torch.zeros(out_features, r, dtype=first_a.dtype)
            for rows, t, _ in unique:
                b[rows] = t["lora_B"]
            rank_of[mine], alpha_of[mine] = r, first_s * r
        else:
            r = sum(t["lora_A"].shape[0] for _, t, _ in unique)
            a = torch.cat([t["lora_A"] for _, t, _ in unique])
            b = torch.zeros(out_features, r, dtype=a.dtype)
            offset = 0
            for rows, t, s in unique:
                k = t["lora_A"].shape[0]
                b[rows, offset:offset + k] = t["lora_B"] * s
                offset += k
            rank_of[mine], alpha_of[mine] = r, float(r)
        joined[f"{mine}.lora_A.weight"], joined[f"{mine}.lora_B.weight"] = a.contiguous(), b.contiguous()
        if use_dora:
            magnitude = torch.zeros(out_features, dtype=a.dtype)
            for rows, t, _ in unique:
                if "lora_magnitude_vector" not in t:
                    raise ConfigError(f"--lora {file}: DoRA adapter without lora_magnitude_vector for {mine}")
                magnitude[rows] = t["lora_magnitude_vector"]
            joined[f"{mine}.lora_magnitude_vector"] = magnitude
    modules = [n for n in linears if n in by_module]
    rank = Counter(rank_of.values()).most_common(1)[0][0]
    alpha = Counter(alpha_of.values()).most_common(1)[0][0]
    info = AdapterInfo(
        rank=rank, alpha=alpha, targets=modules, target_modules=modules, variant="dora" if use_dora else "lora",
        dropout=float(meta.get("lora_dropout", 0.0)), base_model=f"diffusers LoRA {file.name}", base_sha256=None,
        rank_pattern={m: v for m, v in rank_of.items() if v != rank},
        alpha_pattern={m: v for m, v in alpha_of.items() if v != alpha}, source=str(file),
    )
    return info, joined
