"""Pipelines: one per modality, one shared base (``base.Pipeline``). Load once, then call.

    import ditkit, torch
    pipe = ditkit.load("results/digits")                 # the right pipeline for the run's modality
    out = pipe(class_labels=[1, 2], num_inference_steps=50, guidance_scale=1.25,
               generator=torch.Generator().manual_seed(0))

``ditkit sample``, ``ditkit eval``, the training loop's sample grids and ``ditkit serve`` all go
through these classes (``ditkit.registry.PIPELINES``, keyed by ``Config.modality``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ditkit.checkpoint_io import Checkpoint
from ditkit.config import Config, ConfigError
from ditkit.pipelines.base import Pipeline
from ditkit.registry import PIPELINES

__all__ = ["load", "pipeline_class", "pipeline_name", "write_training_samples", "Pipeline"]


def pipeline_name(cfg: Config) -> str:
    """The registered pipeline name of ``cfg`` (``ditkit.registry.PIPELINES``): its model family's
    ``pipeline`` meta when it names one (text-to-image models: ``text_to_image``), else
    ``cfg.modality``."""
    from ditkit.builders import model_family
    from ditkit.registry import MODEL_FAMILIES

    try:
        return MODEL_FAMILIES.get(model_family(cfg)).meta.get("pipeline", cfg.modality)
    except ConfigError:  # not a preset (imported weights, a user's model): the modality decides
        return cfg.modality


def pipeline_class(cfg: Config) -> type[Pipeline]:
    """The registered pipeline class of ``cfg`` (``pipeline_name``)."""
    return PIPELINES.get(pipeline_name(cfg)).obj


def load(
    path: str | Path | Checkpoint,
    *,
    device: str = "auto",
    precision: str = "auto",
    use_ema: bool = True,
    **extras: Any,
) -> Pipeline:
    """Load a run or checkpoint once and return the pipeline of its modality (``ImagePipeline``,
    ``TextPipeline``, ...). ``device``: auto, cpu, cuda[:N]; ``precision``: fp32, bf16 or auto (the
    default: as training -- fp32 for runs trained in fp32, else bf16 where the hardware runs it
    natively; ``base.sampling_dtype``, measured in docs/fast_sampling.md);
    ``use_ema``: the EMA weights when the checkpoint has them (``pipe.weights`` says which were
    loaded); ``extras``: the modality's own options (``vae=PATH`` for latent image models).
    Raises ``ConfigError`` (``CheckpointError``) naming the path when it holds no checkpoint."""
    checkpoint = Checkpoint.open(path)
    return pipeline_class(checkpoint.config).from_checkpoint(
        checkpoint, device=device, precision=precision, use_ema=use_ema, **extras
    )


def write_training_samples(
    model: torch.nn.Module,
    cfg: Config,
    path_stem: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    **extras: Any,
) -> Path:
    """The training loop's sample hook: the pipeline of ``cfg``'s modality on the model in memory
    (EMA weights) writes its samples at ``path_stem`` + its suffix (a PNG grid, a .txt, ...) and
    returns the path. ``extras``: ``vae`` (latent image runs), ``tokenizer`` (text runs, and prompt
    runs' caption tokenizer); None values are dropped. Leaves the training RNGs untouched."""
    given = {k: v for k, v in extras.items() if v is not None}
    pipe = pipeline_class(cfg)(model, cfg, weights="ema (training)", device=device, dtype=dtype, **given)
    return pipe.write_training_samples(path_stem)
