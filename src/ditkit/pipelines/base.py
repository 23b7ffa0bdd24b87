"""The shared base of every modality's pipeline: a checkpoint (or a model in memory) loaded once,
on one device at one precision, called many times like diffusers' pipelines.

A pipeline owns: the config, the network (EMA weights by default, reported honestly as "model"
when a checkpoint has none), the objective, device and dtype, the class names, and the provenance
metadata written into every output. Modality pipelines (``image.py``, ``text.py``, ...) register
in ``ditkit.registry.PIPELINES`` under ``Config.modality`` and add ``__call__``.

Randomness: sample ``i`` draws everything from ``torch.Generator().manual_seed(seed + i)`` by
default, so a sample does not depend on the batch it was drawn in. A caller may pass
``generator``: one ``torch.Generator`` (draws for the whole batch, as diffusers does) or a list of
them, one per sample.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

import torch

import ditkit
from ditkit.builders import build_objective, load_model
from ditkit.checkpoint_io import Checkpoint
from ditkit.config import Config, ConfigError
from ditkit.device import autocast, resolve_device, resolve_precision
from ditkit.models.layers import LabelEmbedder

__all__ = ["Pipeline", "GeneratorArg", "resolve_generators", "class_names_of", "unconditional_branch_trained"]

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]
P = TypeVar("P", bound="Pipeline")


def class_names_of(cfg: Config) -> list[str]:
    """Names of the labels ``0..num_classes-1``: the ones training recorded (``data.class_names``:
    folder names or a built-in set's names), else the numbers."""
    n = cfg.data.num_classes or 0
    names = list(cfg.data.class_names or [])
    if len(names) == n:
        return names
    return [str(i) for i in range(n)]


def unconditional_branch_trained(model: torch.nn.Module) -> bool:
    """Whether classifier-free guidance's unconditional branch was trained: the label embedder
    dropped labels to the null class during training (``class_dropout_prob > 0``). With no
    dropout the null row keeps its random initialisation and guiding against it is meaningless.
    Models without a label embedder (unconditional) answer True: there is nothing to guide."""
    embedders = [m for m in model.modules() if isinstance(m, LabelEmbedder)]
    return all(e.dropout_prob > 0 for e in embedders)


def resolve_generators(
    num_samples: int, seed: int, generator: GeneratorArg
) -> tuple[Optional[list[int]], Union[torch.Generator, list[torch.Generator]]]:
    """``(seeds per sample or None, generator(s))``: by default one generator per sample seeded
    ``seed + i``; a caller's list must hold one generator per sample; one generator is shared."""
    if generator is None:
        seeds = [seed + i for i in range(num_samples)]
        return seeds, [torch.Generator().manual_seed(s) for s in seeds]
    if isinstance(generator, torch.Generator):
        return None, generator
    generators = list(generator)
    if len(generators) != num_samples:
        raise ConfigError(f"generator: got {len(generators)} generators for {num_samples} samples; pass one per sample")
    return None, generators


def generator_slice(
    generators: Union[torch.Generator, list[torch.Generator]], lo: int, hi: int
) -> Union[torch.Generator, list[torch.Generator]]:
    """The generators of samples ``lo:hi`` (a shared generator is shared by every batch)."""
    return generators if isinstance(generators, torch.Generator) else generators[lo:hi]


class Pipeline:
    """Base class of the modality pipelines. Build one with ``from_checkpoint`` (or ``ditkit.load``)
    or, for a model in memory (training-time sample grids), with ``Pipeline(model, cfg, ...)``."""

    modality: str = ""
    supports_distributed: bool = False  # ``ditkit sample`` under torchrun shares the samples over ranks

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Config,
        *,
        checkpoint: Optional[Checkpoint] = None,
        weights: str = "in memory",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.weights = weights
        self.objective = self.build_objective()
        self.class_names = class_names_of(cfg)
        self._sha256: Optional[str] = None

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls: type[P],
        ckpt: str | Path | Checkpoint,
        *,
        device: str = "auto",
        precision: str = "fp32",
        use_ema: bool = True,
        **extras: Any,
    ) -> P:
        """Load a checkpoint (a ``step_*`` directory, a run directory: its newest checkpoint, or an
        opened ``Checkpoint``) once. ``precision``: fp32, bf16 or auto (bf16 where native).
        ``extras`` are the modality's own (e.g. ``vae`` for latent image models)."""
        checkpoint = Checkpoint.open(ckpt)
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        cls.check_extras(checkpoint.config, **extras)  # cheap checks before the weights load
        model, which = load_model(checkpoint, use_ema=use_ema)
        return cls(model, checkpoint.config, checkpoint=checkpoint, weights=which, device=dev, dtype=dtype, **extras)

    @classmethod
    def check_extras(cls, cfg: Config, **extras: Any) -> None:
        """Refuse extras the modality does not take (subclasses check their own)."""
        if extras:
            raise ConfigError(f"{', '.join(sorted(extras))}: not an option of {cls.modality} pipelines")

    def build_objective(self) -> Any:
        return build_objective(self.cfg)

    # ---- facts ---------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of real classes (0: unconditional model)."""
        return self.cfg.data.num_classes or 0

    @property
    def step(self) -> Optional[int]:
        return self.checkpoint.step if self.checkpoint is not None else None

    @property
    def checkpoint_sha256(self) -> str:
        """SHA-256 of the weights file in use ("" for a model in memory); computed once."""
        if self._sha256 is None:
            self._sha256 = self.checkpoint.sha256(self.weights) if self.checkpoint is not None else ""
        return self._sha256

    def provenance(self) -> dict[str, str]:
        """The entries that identify where an output came from (written into every output)."""
        cfg = self.cfg
        meta = {
            "software": f"ditkit {ditkit.__version__}",
            "model": cfg.model.name,
            "checkpoint": str(self.checkpoint.dir) if self.checkpoint is not None else "(in memory)",
            "checkpoint_sha256": self.checkpoint_sha256,
            "step": str(self.step),
            "weights": self.weights,
            "dataset": cfg.data.dataset,
            "objective": cfg.objective.kind + (f"/{cfg.objective.prediction}" if cfg.objective.kind == "gaussian" else ""),
            "precision": str(self.dtype).removeprefix("torch."),
        }
        return meta

    # ---- shared sampling pieces ------------------------------------------------------------------
    def resolve_labels(
        self, class_labels: Optional[Sequence[int | str]], num_samples: Optional[int], default_count: int = 16
    ) -> tuple[Optional[list[int]], int]:
        """``(labels per sample or None, number of samples)``. Labels are ints or class names;
        a conditional model's labels default to ``0, 1, ..., K-1, 0, ...``; given labels repeat to
        ``num_samples``. An unconditional model refuses labels."""
        if num_samples is not None and num_samples < 1:
            raise ConfigError(f"--num-samples {num_samples}: must be at least 1")
        k = self.num_classes
        if k == 0:
            if class_labels:
                raise ConfigError("this checkpoint is unconditional (trained without labels): drop --class-labels")
            return None, num_samples or default_count
        if not class_labels:
            n = num_samples or default_count
            return [i % k for i in range(n)], n
        names = {name.lower(): i for i, name in enumerate(self.class_names)}
        labels = []
        for item in class_labels:
            if isinstance(item, str) and not item.strip().lstrip("-").isdigit():
                key = item.strip().lower()
                if key not in names:
                    raise ConfigError(
                        f"class label {item!r} is not a class of this model; use one of {', '.join(self.class_names)} or 0..{k - 1}"
                    )
                labels.append(names[key])
                continue
            label = int(item)
            if not 0 <= label < k:
                raise ConfigError(
                    f"class label {label} is outside this checkpoint's classes 0..{k - 1}: pass --class-labels between 0 and {k - 1}"
                )
            labels.append(label)
        n = num_samples or len(labels)
        return [labels[i % len(labels)] for i in range(n)], n

    def check_guidance(self, guidance_scale: float, allow_untrained_uncond: bool = False) -> None:
        """Refuse classifier-free guidance against an unconditional branch that was never trained
        (``class_dropout_prob = 0``), or warn once when ``allow_untrained_uncond``."""
        if guidance_scale < 0:
            raise ConfigError(f"--cfg-scale {guidance_scale}: use a value >= 0 (1 = no guidance)")
        if guidance_scale == 1.0 or self.num_classes == 0 or unconditional_branch_trained(self.model):
            return
        message = (
            f"guidance scale {guidance_scale} guides against the null class, which this model never trained "
            "(model.class_dropout_prob = 0): use --cfg-scale 1, or retrain with label dropout "
            "(--set model.class_dropout_prob=0.1)"
        )
        if not allow_untrained_uncond:
            raise ConfigError(message + "; --allow-untrained-uncond samples anyway")
        warnings.warn(message, stacklevel=3)

    def forward_fn(self) -> Callable[..., torch.Tensor]:
        """``forward(x, t, y)``: the network under this pipeline's autocast, float32 out."""
        model, device, dtype = self.model, self.device, self.dtype

        def forward(x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
            with autocast(device, dtype):
                return model(x, t, y).float()

        return forward

    # ---- the command line (``ditkit sample``): each modality adds its own flags -----------------------
    @classmethod
    def add_cli_arguments(cls, parser: Any) -> None:
        """Add this modality's ``ditkit sample`` flags (``parser.add_argument``). Flags must default
        to None/False so the CLI can tell which were given."""

    @classmethod
    def cli_extras(cls, args: Any) -> dict[str, Any]:
        """Keyword arguments of ``from_checkpoint`` taken from the command line (e.g. ``vae``)."""
        return {}

    def cli_call(self, args: Any, distributed: bool = False) -> Any:
        """Run ``self(...)`` with the parsed ``ditkit sample`` arguments; returns the output."""
        raise NotImplementedError

    def cli_save(self, output: Any, args: Any, out_dir: Path) -> list[Path]:
        """Write ``output`` under ``out_dir``; returns the paths written."""
        return output.save(out_dir)

    def cli_summary(self, output: Any) -> str:
        meta = output.metadata
        return (f"{len(output.tensors) if hasattr(output, 'tensors') else len(output.texts)} samples "
                f"({meta['sampler']}, {meta['num_sampling_steps']} steps, cfg {meta['cfg_scale']}) from {meta['checkpoint']}")
