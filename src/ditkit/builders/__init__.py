"""Config -> model, objective, loaded checkpoint: the one place that turns a ``Config`` into the
objects the trainer, the pipelines and interop use.

* ``build_model(cfg)``: a freshly initialised network of the family ``cfg.model.name`` belongs to
  (``MODEL_FAMILIES``), with constructor arguments from that family's builder (``MODEL_BUILDERS``,
  one module per family in this folder: ``dit.py``, ``text.py``).
* ``build_objective(cfg)``: the ``OBJECTIVES`` entry named by ``cfg.objective.kind``.
* ``check_model_config(cfg)``: every model check that needs no data (preflight).
* ``load_model(ckpt)``: a ``Checkpoint`` to ``(model in eval mode, weights used)``.
"""

from __future__ import annotations

from typing import Any

import torch

from ditkit.checkpoint_io import Checkpoint
from ditkit.config import Config, ConfigError
from ditkit.registry import MODEL_BUILDERS, MODEL_FAMILIES, OBJECTIVES

__all__ = [
    "model_family", "model_kwargs", "build_model", "build_objective", "check_model_config", "load_model",
    "default_sampler", "objective_entry", "load_teacher", "training_objective",
]


def model_family(cfg: Config) -> str:
    """The family (``MODEL_FAMILIES`` name) whose presets hold ``cfg.model.name``."""
    for entry in MODEL_FAMILIES.entries():
        if cfg.model.name in entry.meta.get("presets", {}):
            return entry.name
    presets = [p for e in MODEL_FAMILIES.entries(modality=cfg.modality) for p in e.meta.get("presets", {})]
    raise ConfigError(f"--model {cfg.model.name!r} is not a preset; choose one of: {', '.join(presets)}")


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """Constructor arguments of ``cfg``'s model (preset, then ``cfg.model`` fields, then the sizes
    the data and objective decide). Raises ``ConfigError`` for impossible sizes."""
    family = model_family(cfg)
    entry = MODEL_FAMILIES.get(family)
    if entry.modality != cfg.modality:
        raise ConfigError(
            f"--model {cfg.model.name} is a {entry.modality} model but objective.kind={cfg.objective.kind} "
            f"trains {cfg.modality}: pick a {cfg.modality} model or objective"
        )
    return MODEL_BUILDERS.get(family).obj(cfg)


def build_model(cfg: Config) -> torch.nn.Module:
    """A freshly initialised network for ``cfg`` (fp32, CPU)."""
    return MODEL_FAMILIES.get(model_family(cfg)).obj(**model_kwargs(cfg))


def objective_entry(cfg: Config) -> Any:
    """The ``OBJECTIVES`` entry of ``cfg.objective.kind`` (``ConfigError`` listing the kinds)."""
    return OBJECTIVES.get(cfg.objective.kind)


def build_objective(cfg: Config, **overrides: Any) -> Any:
    """The objective of ``cfg.objective`` (``overrides`` go to its ``from_config``, e.g. the
    sampling-time ``clip_x0`` of gaussian objectives). An objective registered with ``teacher=True``
    (distillation) also gets ``load_teacher`` (``load_teacher`` below), used on its first loss."""
    entry = objective_entry(cfg)
    if entry.meta.get("teacher"):
        overrides.setdefault("load_teacher", load_teacher)
    return entry.obj.from_config(cfg, **overrides)


def load_teacher(path: str) -> tuple[torch.nn.Module, Any, Config]:
    """``(frozen EMA network in eval mode on the CPU, its objective with its sampling x0 clamp, its
    config)`` of the run or checkpoint ``path``: the teacher of a distillation objective."""
    ckpt = Checkpoint.open(path)
    model, _ = load_model(ckpt)
    model.requires_grad_(False)
    tcfg = ckpt.config
    clip = tcfg.objective.clip_x0  # as pipelines.denoising.sampling_clip_x0: auto = 1 for pixels
    clip = (None if tcfg.data.latent_channels else 1.0) if clip is None else (clip or None)
    return model, build_objective(tcfg, clip_x0=clip), tcfg


def training_objective(cfg: Config) -> Any:
    """What the trainer minimises: ``build_objective(cfg)``, wrapped for MaskDiT token masking when
    ``objective.mask_ratio`` > 0 (``ditkit.diffusion.masking.MaskedTokenTraining``; sampling never
    masks, so the pipelines use the plain objective)."""
    objective = build_objective(cfg)
    if not cfg.objective.mask_ratio:
        return objective
    from ditkit.diffusion.masking import MaskedTokenTraining

    return MaskedTokenTraining(objective, cfg.objective.mask_ratio, model_kwargs(cfg)["patch_size"],
                               cfg.objective.mae_weight)


def default_sampler(cfg: Config) -> str:
    """``sample.sampler`` with ``auto`` resolved to the objective's default sampler."""
    name = cfg.sample.sampler
    return objective_entry(cfg).obj.default_sampler if name == "auto" else name


def check_model_config(cfg: Config) -> None:
    """Model checks that need no data: the preset exists and fits the objective, sizes divide.
    Sizes the data decides later (channels, classes, vocabulary) get placeholders here."""
    probe = Config.from_dict(cfg.to_dict())
    probe.data.channels = probe.data.channels or 1
    probe.data.num_classes = 0 if probe.data.num_classes is None else probe.data.num_classes
    probe.data.vocab_size = probe.data.vocab_size or 2
    model_kwargs(probe)
    objective_entry(probe)


def load_model(ckpt: Checkpoint, use_ema: bool = True) -> tuple[torch.nn.Module, str]:
    """``(model in eval mode on the CPU, "ema" or "model")``: the checkpoint's weights in the
    network its config builds; ``ConfigError`` when they do not match."""
    model = build_model(ckpt.config)
    state, which = ckpt.weights("ema" if use_ema else "model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{ckpt.dir}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), which
