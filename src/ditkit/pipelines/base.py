"""The shared base of every modality's pipeline: a checkpoint (or a model in memory) loaded once,
on one device at one precision, called many times like diffusers' pipelines.

A pipeline owns: the config, the network (EMA weights by default, reported honestly as "model"
when a checkpoint has none), the objective, device and dtype, the class names, and the provenance
metadata written into every output. Modality pipelines (``image.py``, ``text.py``, ...) register
in ``ditkit.registry.PIPELINES`` under ``Config.modality`` and add ``__call__``.

LoRA: ``pipe.load_lora(path, scale)`` stacks adapters (``ditkit.adapters``) on the network,
``pipe.unload_lora(name)`` removes them; ``ditkit sample --lora PATH[:WEIGHT]`` (repeatable) does the
same, and every output records the adapters (name, scale, file hash). A LoRA run (``train.lora_rank``)
loads as its base (``train.init_from``) with the run's EMA adapter applied.

Randomness: sample ``i`` draws everything from ``torch.Generator().manual_seed(seed + i)`` by
default, so a sample does not depend on the batch it was drawn in. A caller may pass
``generator``: one ``torch.Generator`` (draws for the whole batch, as diffusers does) or a list of
them, one per sample.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

import torch

import ditkit
from ditkit.adapters import adapters_of, load_adapter, parse_adapter_spec, unload_adapters
from ditkit.builders import build_model, build_objective, load_model
from ditkit.checkpoint_io import ADAPTER_DIR, EMA_ADAPTER_DIR, Checkpoint, CheckpointError, is_adapter_checkpoint
from ditkit.config import Config, ConfigError
from ditkit.device import autocast, resolve_device, resolve_precision
from ditkit.models.layers import LabelEmbedder

__all__ = ["Pipeline", "trajectory_indices", "GeneratorArg", "resolve_generators", "class_names_of", "unconditional_branch_trained",
           "sampling_dtype"]

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]
P = TypeVar("P", bound="Pipeline")


def trajectory_indices(num_steps: int, count: int) -> list[int]:
    """``count`` step indices spread over ``0..num_steps-1`` (always including the last)."""
    count = min(count, num_steps)
    return sorted({round(i * (num_steps - 1) / max(count - 1, 1)) for i in range(count)})


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


def sampling_dtype(precision: str, cfg: Config, device: torch.device) -> torch.dtype:
    """The autocast dtype of sampling. ``"fp32"`` / ``"bf16"``: that (``ConfigError`` for bf16 on a GPU
    without it). ``"auto"``: sample as training did -- float32 for a run trained in fp32 and for
    imported checkpoints (``recipe`` import-*: no training here to follow), else (``train.precision``
    auto or bf16) bf16 where the hardware runs it natively and float32 elsewhere
    (``ditkit.device.resolve_precision``). Measured for image models only (digits main job: the same
    FD, 2.9x the images/s; docs/fast_sampling.md), so other modalities stay float32 under auto."""
    if precision != "auto":
        return resolve_precision(precision, device)
    if cfg.train.precision == "fp32" or (cfg.recipe or "").startswith("import") or cfg.modality != "image":
        return torch.float32
    return resolve_precision("auto", device)


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
        self._adapter_sha256: dict[str, str] = {}  # adapter file -> its SHA-256 (provenance)

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls: type[P],
        ckpt: str | Path | Checkpoint,
        *,
        device: str = "auto",
        precision: str = "auto",
        use_ema: bool = True,
        lora: Optional[Sequence[str]] = None,
        **extras: Any,
    ) -> P:
        """Load a checkpoint (a ``step_*`` directory, a run directory: its newest checkpoint, or an
        opened ``Checkpoint``) once. ``precision``: fp32, bf16 or auto (as training: fp32 for runs
        trained in fp32, else bf16 where native; ``sampling_dtype``). ``extras`` are the modality's
        own (e.g. ``vae`` for latent image models). ``lora``: adapters to stack, ``"PATH[:WEIGHT]"``
        each (``--lora``; see ``load_lora``)."""
        checkpoint = Checkpoint.open(ckpt)
        dev = resolve_device(device)
        dtype = sampling_dtype(precision, checkpoint.config, dev)
        cls.check_extras(checkpoint.config, **extras)  # cheap checks before the weights load
        specs = [parse_adapter_spec(spec) for spec in lora or ()]  # a bad weight fails before loading
        if is_adapter_checkpoint(checkpoint.dir):
            model, which = _load_lora_run(checkpoint, use_ema)
        else:
            model, which = load_model(checkpoint, use_ema=use_ema)
        pipe = cls(model, checkpoint.config, checkpoint=checkpoint, weights=which, device=dev, dtype=dtype, **extras)
        for path, weight in specs:
            pipe.load_lora(path, scale=weight)
        return pipe

    # ---- LoRA adapters -------------------------------------------------------------------------
    def load_lora(self, path: str | Path, scale: float = 1.0, name: Optional[str] = None) -> str:
        """Stack a LoRA adapter on the network (a LoRA run, its checkpoint, an adapter folder or file,
        or a diffusers ``pytorch_lora_weights.safetensors``) at weight ``scale``; returns its name
        (default: the run's name). Raises ``ConfigError`` when it was trained on another base (other
        layers, shapes or base hash: the message names both), or ``scale`` is not a number."""
        name = load_adapter(self.model, path, scale, name)
        self.model.to(self.device).eval()
        return name

    def unload_lora(self, name: Optional[str] = None) -> None:
        """Remove adapter ``name`` (default: all of them, giving back the base network)."""
        unload_adapters(self.model, None if name is None else [name])

    @property
    def loras(self) -> dict[str, float]:
        """The adapters on the network: name -> weight."""
        return {name: info.scale for name, info in adapters_of(self.model).items()}

    def _lora_provenance(self) -> str:
        """JSON list of the adapters in use: name, weight, rank, SHA-256 of the file it came from."""
        entries = []
        for name, info in adapters_of(self.model).items():
            if info.scale == 0:  # loaded but switched off (a server's unpicked adapters)
                continue
            source = info.source or ""
            if source and source not in self._adapter_sha256 and Path(source).is_file():
                self._adapter_sha256[source] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
            entries.append({"name": name, "scale": info.scale, "rank": info.rank,
                            "sha256": self._adapter_sha256.get(source, ""), "base": info.base_model})
        return json.dumps(entries)

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
            "objective": cfg.objective.kind + (f"/{cfg.objective.prediction}" if cfg.objective.kind in ("gaussian", "distill") else ""),
            "precision": str(self.dtype).removeprefix("torch."),
        }
        if cfg.objective.kind == "distill":  # a progressive-distillation student: its teacher and baked-in guidance
            meta["distilled_from"] = str(cfg.objective.teacher)
            meta["distilled_cfg_scale"] = f"{cfg.objective.teacher_cfg_scale:g}"
        if any(info.scale != 0 for info in adapters_of(self.model).values()):
            meta["lora"] = self._lora_provenance()
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
        to None/False so the CLI can tell which were given. Subclasses call this first: it adds the
        flags every modality takes (``--lora``)."""
        parser.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]",
                            help="stack a LoRA adapter (run, checkpoint, adapter folder or file) at WEIGHT (default 1); "
                                 "repeat for several")

    @staticmethod
    def add_trajectory_arguments(parser: Any) -> None:
        """``--trajectory`` / ``--trajectory-points``: one declaration for the modalities that write a
        trajectory file (each pipeline that shows one calls this from its ``add_cli_arguments``)."""
        parser.add_argument("--trajectory", action="store_true",
                            help="also write the sampling trajectory: trajectory.png (images: x0 predictions and x_t; "
                                 "audio: their spectrograms) or trajectory.txt (text: the partly unmasked tokens)")
        parser.add_argument("--trajectory-points", type=int, help="steps shown in the trajectory (default 8)")

    @staticmethod
    def trajectory_points_of(args: Any) -> int:
        """The steps to record from ``--trajectory [--trajectory-points N]``: 0 when off, else N
        (default 8); ``ConfigError`` for N < 1 or N without ``--trajectory``."""
        points = getattr(args, "trajectory_points", None)
        if points is not None and (points < 1 or not getattr(args, "trajectory", False)):
            raise ConfigError(f"--trajectory-points {points}: give a count >= 1, together with --trajectory")
        return (points or 8) if getattr(args, "trajectory", False) else 0

    @classmethod
    def cli_extras(cls, args: Any) -> dict[str, Any]:
        """Keyword arguments of ``from_checkpoint`` taken from the command line (e.g. ``vae``);
        subclasses add theirs to this (``lora``)."""
        return {"lora": args.lora} if getattr(args, "lora", None) else {}

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


def _load_lora_run(checkpoint: Checkpoint, use_ema: bool) -> tuple[torch.nn.Module, str]:
    """A LoRA run's network: its base rebuilt as training built it (``train.init_from``, class map,
    seed), then the run's EMA adapter (``use_ema``; else the raw one) applied at weight 1.
    Returns ``(model, "ema" or "model")``."""
    from ditkit.interop.finetune import init_from
    from ditkit.interop.training import parse_class_map

    cfg = checkpoint.config
    base = cfg.train.init_from
    if base is None or not Path(base).exists():
        raise CheckpointError(
            f"{checkpoint.dir} is a LoRA run whose base (train.init_from) {base} is not there: restore the base "
            "at that path, or merge the adapter into a full run where it is (ditkit lora merge)"
        )
    model = build_model(cfg)
    init_from(model, base, parse_class_map(cfg.train.init_class_map), generator=torch.Generator().manual_seed(cfg.train.seed))
    which = "ema" if use_ema and (checkpoint.dir / EMA_ADAPTER_DIR).is_dir() else "model"
    load_adapter(model, checkpoint.dir / (EMA_ADAPTER_DIR if which == "ema" else ADAPTER_DIR))
    return model.eval(), which
