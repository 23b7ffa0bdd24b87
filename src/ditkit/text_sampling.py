"""Generate text from a trained TextDiT: the text half of ``ditkit.sampling``.

* ``build_text_model(cfg)`` / ``build_text_objective(cfg)``: a text config to a ``TextDiT`` (causal
  for the autoregressive objective) and ``MaskedDiffusion`` / ``AutoregressiveLM``.
  ``ditkit.sampling.build_model`` / ``build_objective`` dispatch here for text configs.
* ``load_text_model(ckpt)``: a checkpoint (or run directory) to ``(model, cfg, ckpt_dir, tokenizer)``.
* ``sample_text(model, cfg, tokenizer, seeds, ...)``: the core loop on a model in memory; prompts,
  suffixes, infill templates, lengths beyond the training window, classifier-free guidance.
* ``generate_text(ckpt, ...)``: all of it from a checkpoint, with metadata.
* ``write_training_samples``: the ``.txt`` the training loop writes every ``sample_every`` steps.

Time convention (docs/architecture.md): the masked objective calls the network with ``1000 * t``,
``t in [0, 1]`` (1 = all masked); the autoregressive one with ``t = 0``. Sample ``i`` draws all its
randomness from ``torch.Generator().manual_seed(seed + i)``, so a sample does not depend on the
batch it was drawn in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

import ditkit
from ditkit.checkpoint_io import (
    checkpoint_facts,
    load_checkpoint_config,
    load_weights,
    resolve_checkpoint,
    weights_sha256,
)
from ditkit.config import Config, ConfigError
from ditkit.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from ditkit.device import autocast, resolve_device, resolve_precision
from ditkit.diffusion.autoregressive import AutoregressiveLM
from ditkit.diffusion.masked import MaskedDiffusion
from ditkit.models.text_dit import TEXT_DIT_PRESETS, TextDiT
from ditkit.samplers.autoregressive import autoregressive
from ditkit.samplers.guidance import classifier_free_guidance
from ditkit.samplers.masked import ancestral, canvas, semi_autoregressive

__all__ = [
    "TEXT_SAMPLERS",
    "text_model_kwargs",
    "build_text_model",
    "build_text_objective",
    "load_checkpoint_tokenizer",
    "load_text_model",
    "default_text_sampler",
    "encode_infill",
    "sample_text",
    "TextGenerateResult",
    "generate_text",
    "format_samples",
    "write_training_samples",
]

TEXT_SAMPLERS = {"masked": "ancestral", "autoregressive": "autoregressive"}
# ModelConfig fields a TextDiT takes (the others are image-only; config.validate refuses them).
_TEXT_MODEL_FIELDS = (
    "hidden_size", "depth", "num_heads", "mlp_ratio", "class_dropout_prob", "qk_norm", "norm", "mlp",
    "grad_checkpointing", "time_conditioning",
)


# ---- config -> model / objective ----------------------------------------------------------------


def text_model_kwargs(cfg: Config) -> dict[str, Any]:
    """``TextDiT(**kwargs)`` for a text config: the preset, then non-None ``cfg.model`` fields, then
    ``vocab_size`` / ``num_classes`` from the data section and ``causal`` from the objective."""
    m = cfg.model
    if m.name not in TEXT_DIT_PRESETS:
        raise ConfigError(f"--model {m.name!r} is not a text preset; choose one of: {', '.join(TEXT_DIT_PRESETS)}")
    kwargs = dict(TEXT_DIT_PRESETS[m.name])
    kwargs.update({k: getattr(m, k) for k in _TEXT_MODEL_FIELDS if getattr(m, k) is not None})
    head = kwargs["hidden_size"] // kwargs["num_heads"]
    if kwargs["hidden_size"] % kwargs["num_heads"] or head % 2:
        raise ConfigError(
            f"model.hidden_size={kwargs['hidden_size']} / model.num_heads={kwargs['num_heads']} must give an even "
            "head size (rotary embeddings rotate pairs of channels)"
        )
    if cfg.data.vocab_size is None or cfg.data.num_classes is None:
        raise ConfigError("data.vocab_size and data.num_classes must be known to build a text model (set by training)")
    kwargs.update(
        vocab_size=cfg.data.vocab_size,
        num_classes=cfg.data.num_classes,
        causal=cfg.objective.kind == "autoregressive",
        max_seq_len=cfg.data.seq_len,
    )
    return kwargs


def build_text_model(cfg: Config) -> TextDiT:
    """A freshly initialised TextDiT for ``cfg`` (fp32, CPU)."""
    return TextDiT(**text_model_kwargs(cfg))


def build_text_objective(cfg: Config) -> MaskedDiffusion | AutoregressiveLM:
    """``MaskedDiffusion`` (``mask_eps``, ``time_sampling``) or ``AutoregressiveLM`` for ``cfg``."""
    o, vocab = cfg.objective, cfg.data.vocab_size
    if vocab is None:
        raise ConfigError("data.vocab_size must be known to build a text objective (set by training)")
    if o.kind == "masked":
        return MaskedDiffusion(vocab, eps=o.mask_eps, time_sampling=o.time_sampling)
    if o.kind == "autoregressive":
        return AutoregressiveLM(vocab)
    raise ConfigError(f"objective.kind={o.kind!r} is not a text objective: use masked or autoregressive")


def default_text_sampler(cfg: Config) -> str:
    """The one sampler of each text objective: ``ancestral`` (masked) or ``autoregressive``."""
    return TEXT_SAMPLERS[cfg.objective.kind]


# ---- checkpoints ---------------------------------------------------------------------------------


def load_checkpoint_tokenizer(ckpt_dir: str | Path) -> Tokenizer:
    """The tokenizer saved in a checkpoint directory (or, failing that, in its run directory)."""
    ckpt_dir = Path(ckpt_dir)
    for where in (ckpt_dir, ckpt_dir.parent.parent):
        if (where / TOKENIZER_FILE).is_file():
            return load_tokenizer(where)
    raise ConfigError(f"{ckpt_dir} holds no {TOKENIZER_FILE}: it was not trained on text by ditkit")


def load_text_model(ckpt: str | Path, use_ema: bool = True) -> tuple[TextDiT, Config, Path, Tokenizer]:
    """``(model in eval mode on CPU, its config, the checkpoint directory, its tokenizer)``."""
    ckpt_dir = resolve_checkpoint(ckpt)
    cfg = load_checkpoint_config(ckpt_dir)
    if cfg.modality != "text":
        raise ConfigError(f"{ckpt_dir} is an image checkpoint ({cfg.objective.kind}): this command needs a text model")
    tokenizer = load_checkpoint_tokenizer(ckpt_dir)
    model = build_text_model(cfg)
    missing, unexpected = model.load_state_dict(load_weights(ckpt_dir, "ema" if use_ema else "model"), strict=False)
    if missing or unexpected:
        raise ConfigError(f"{ckpt_dir}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), cfg, ckpt_dir, tokenizer


# ---- sampling ------------------------------------------------------------------------------------


def encode_infill(tokenizer: Tokenizer, template: str, mask_char: str = "_") -> list[int]:
    """Token ids of an infill template: every ``mask_char`` is one position to generate (the mask
    id), the text between them is encoded as it is (so a BPE template keeps its literal pieces)."""
    if len(mask_char) != 1:
        raise ConfigError(f"--mask-char {mask_char!r}: use a single character")
    if mask_char not in template:
        raise ConfigError(f"--infill {template!r} has no {mask_char!r}: mark each position to generate with it")
    ids: list[int] = []
    pieces = template.split(mask_char)
    for i, piece in enumerate(pieces):
        ids += _encode(tokenizer, piece)
        if i < len(pieces) - 1:
            ids.append(tokenizer.mask_id)
    return ids


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    try:
        return tokenizer.encode(text) if text else []
    except ValueError as err:
        raise ConfigError(f"cannot encode {text!r}: {err}") from None


@torch.no_grad()
def sample_text(
    model: torch.nn.Module,
    cfg: Config,
    tokenizer: Tokenizer,
    seeds: Sequence[int],
    labels: Optional[Sequence[int]] = None,
    *,
    prompt: Optional[str] = None,
    suffix: Optional[str] = None,
    infill: Optional[str] = None,
    mask_char: str = "_",
    num_tokens: Optional[int] = None,
    num_sampling_steps: Optional[int] = None,
    cfg_scale: Optional[float] = None,
    remasking: Optional[str] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    stride: Optional[int] = None,
    at_document_start: bool = True,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, int]:
    """Draw ``len(seeds)`` token sequences with ``model`` (on ``device``, eval mode).

    Masked objective: MDLM ancestral sampling (``cache`` on when the model ignores ``t``) on a canvas
    of ``num_tokens`` (default ``data.seq_len``) with the ``prompt`` fixed at the start and the
    ``suffix`` at the end, or on an ``infill`` template (``mask_char`` marks each position to fill);
    longer than ``seq_len``, semi-autoregressive windows advancing by ``stride`` (default half a
    window). Autoregressive objective: next-token sampling after the prompt (temperature, top-k).
    With ``at_document_start`` a separator precedes the prompt/template, as a document begins in
    the packed training stream. ``labels`` with ``cfg_scale != 1``: classifier-free guidance on the
    logits. Options left None come from ``cfg.sample``.

    Returns ``(tokens (N, num_tokens [+ 1]) int64 on CPU, start)``: ``tokens[:, start:]`` is the
    text (``start`` = 1 when a separator was put in front, else 0).
    """
    s, kind = cfg.sample, cfg.objective.kind
    steps = s.num_sampling_steps if num_sampling_steps is None else num_sampling_steps
    cfg_scale = s.cfg_scale if cfg_scale is None else cfg_scale
    temperature = s.temperature if temperature is None else temperature
    top_k = s.top_k if top_k is None else top_k
    remasking = s.remasking if remasking is None else remasking
    seq_len, num_classes = cfg.data.seq_len, cfg.data.num_classes or 0
    mask_id = tokenizer.mask_id
    if steps < 1:
        raise ConfigError(f"--num-sampling-steps {steps}: must be at least 1")
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature}: use a value >= 0 (0 = greedy)")
    if kind == "autoregressive" and (suffix or infill):
        raise ConfigError("an autoregressive model writes left to right: --suffix and --infill need a masked model")
    if kind == "masked" and top_k is not None:
        raise ConfigError("--top-k applies to the autoregressive sampler only")
    if infill is not None and (prompt or suffix):
        raise ConfigError("--infill is the whole template: put the prompt and suffix text into it")

    lead = [tokenizer.sep_id] if at_document_start and (prompt or infill) else []
    start = len(lead)
    if infill is not None:
        template = lead + encode_infill(tokenizer, infill, mask_char)
        if num_tokens is not None and num_tokens != len(template) - start:
            raise ConfigError(f"--num-tokens {num_tokens} differs from the {len(template) - start} tokens of --infill")
        length = len(template)
    else:
        prefix = lead + _encode(tokenizer, prompt or "")
        tail = _encode(tokenizer, suffix or "")
        length = start + (seq_len if num_tokens is None else num_tokens)
        if length - len(prefix) - len(tail) < 1:
            raise ConfigError(
                f"--num-tokens {length - start} leaves nothing to generate after {len(prefix) - start} prompt and "
                f"{len(tail)} suffix tokens: raise --num-tokens"
            )
    if kind == "masked" and length > seq_len and (suffix or infill):
        raise ConfigError(
            f"--suffix/--infill must fit the training window of {seq_len} tokens (asked for {length}): "
            "shorten the text or --num-tokens"
        )
    if kind == "masked" and length > seq_len:
        stride = seq_len // 2 if stride is None else stride
        if not 0 < stride <= seq_len:
            raise ConfigError(f"--stride {stride}: use 1..{seq_len} (the training window)")

    device = torch.device(device)
    objective = build_text_objective(cfg)

    def forward(x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        with autocast(device, dtype):
            return model(x, t, y).float()

    outputs = []
    for lo in range(0, len(seeds), batch_size):
        chunk = list(seeds[lo : lo + batch_size])
        B = len(chunk)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in chunk]
        y = None
        if num_classes and labels is not None:
            y = torch.tensor(list(labels[lo : lo + batch_size]), dtype=torch.long, device=device)
        elif num_classes:  # a conditional model needs a label: the null class samples unconditionally
            y = torch.full((B,), num_classes, dtype=torch.long, device=device)
        if y is not None and labels is not None and cfg_scale != 1.0:
            net = classifier_free_guidance(forward, y, cfg_scale, null_class=num_classes)
        else:
            net = lambda x, t, y=y: forward(x, t, y)  # noqa: E731
        if kind == "autoregressive":
            prefix_t = torch.tensor(prefix, dtype=torch.long, device=device).expand(B, -1)
            next_token = objective.denoiser(net, seq_len)
            out = autoregressive(next_token, prefix_t, length - prefix_t.shape[1], temperature=temperature,
                                 top_k=top_k, generator=generators)
        else:
            denoiser = objective.denoiser(net)
            options = dict(remasking=remasking, cache=not getattr(model, "time_conditioning", True),
                           temperature=temperature, generator=generators)
            if infill is not None:
                x = torch.tensor(template, dtype=torch.long, device=device).expand(B, -1).clone()
                out = ancestral(denoiser, x, steps, mask_id=mask_id, **options)
            elif length <= seq_len:
                x = canvas(length, mask_id, B, prefix=torch.tensor(prefix, dtype=torch.long) if prefix else None,
                           suffix=torch.tensor(tail, dtype=torch.long) if tail else None, device=device)
                out = ancestral(denoiser, x, steps, mask_id=mask_id, **options)
            else:
                prefix_t = torch.tensor(prefix, dtype=torch.long, device=device).expand(B, -1)
                out = semi_autoregressive(denoiser, prefix_t, length, window=seq_len, stride=stride,
                                          num_steps=steps, mask_id=mask_id, **options)
        outputs.append(out.cpu())
    return torch.cat(outputs), start


@dataclass
class TextGenerateResult:
    """tokens: ``(N, L)`` int64 (``tokens[:, start:]`` is the text); texts: decoded samples;
    labels / seeds per sample; metadata: strings that identify the run; class_names if labelled."""

    tokens: Tensor
    start: int
    texts: list[str]
    labels: Optional[list[int]]
    seeds: list[int]
    metadata: dict[str, str]
    class_names: list[str] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per sample: index, seed, label (and its name), text."""
        rows = []
        for i, text in enumerate(self.texts):
            row: dict[str, Any] = {"index": i, "seed": self.seeds[i], "text": text}
            if self.labels is not None:
                row["label"] = self.labels[i]
                if self.labels[i] < len(self.class_names):
                    row["class_name"] = self.class_names[self.labels[i]]
            rows.append(row)
        return rows


def generate_text(
    ckpt: str | Path,
    *,
    class_labels: Optional[Sequence[int]] = None,
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    use_ema: bool = True,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 64,
    **options: Any,
) -> TextGenerateResult:
    """Sample text from a checkpoint (a ``step_*`` directory, or a run directory: its newest).

    ``options`` go to ``sample_text`` (prompt, suffix, infill, mask_char, num_tokens,
    num_sampling_steps, cfg_scale, remasking, temperature, top_k, stride, at_document_start).
    Sample ``i`` uses seed ``seed + i`` (default ``sample.seed`` of the checkpoint).
    """
    from ditkit.sampling import resolve_labels  # labels are checked as for images

    ckpt_dir = resolve_checkpoint(ckpt)
    cfg = load_checkpoint_config(ckpt_dir)
    labels, n = resolve_labels(cfg.data.num_classes or 0, class_labels, num_samples)
    seed = cfg.sample.seed if seed is None else seed
    seeds = [seed + i for i in range(n)]
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model, cfg, ckpt_dir, tokenizer = load_text_model(ckpt_dir, use_ema=use_ema)
    tokens, start = sample_text(model.to(dev), cfg, tokenizer, seeds, labels, batch_size=batch_size,
                                device=dev, dtype=dtype, **options)
    texts = [tokenizer.decode(row[start:].tolist()) for row in tokens]
    s = cfg.sample
    if cfg.objective.kind == "autoregressive":  # one network call per generated token
        steps = tokens.shape[1] - start - len(_encode(tokenizer, options.get("prompt") or ""))
    else:
        steps = options.get("num_sampling_steps") or s.num_sampling_steps
    metadata = {
        "software": f"ditkit {ditkit.__version__}",
        "model": cfg.model.name,
        "checkpoint": str(ckpt_dir),
        "checkpoint_sha256": weights_sha256(ckpt_dir, "ema" if use_ema else "model"),
        "step": str(checkpoint_facts(ckpt_dir)["step"]),
        "weights": "ema" if use_ema else "model",
        "dataset": cfg.data.dataset,
        "objective": cfg.objective.kind,
        "sampler": default_text_sampler(cfg),
        "num_sampling_steps": str(steps),
        "cfg_scale": str(s.cfg_scale if options.get("cfg_scale") is None else options["cfg_scale"]),
        "temperature": str(s.temperature if options.get("temperature") is None else options["temperature"]),
        "seed": str(seed),
        "precision": str(dtype).removeprefix("torch."),
    }
    for key in ("prompt", "suffix", "infill"):
        if options.get(key):
            metadata[key] = str(options[key])
    class_names = _class_names(cfg)
    return TextGenerateResult(tokens, start, texts, labels, seeds, metadata, class_names)


def _class_names(cfg: Config) -> list[str]:
    """Names of the labels of the built-in mixed synthetic corpus; numbers otherwise."""
    if cfg.data.dataset == "synthetic" and cfg.data.num_classes == 2:
        return ["brackets", "sums"]  # sorted label strings, as build_text_dataset numbers them
    return [str(i) for i in range(cfg.data.num_classes or 0)]


def format_samples(texts: Sequence[str], header: Callable[[int], str]) -> str:
    """Samples one after another, each under ``header(i)``, for a human-readable ``.txt``."""
    return "".join(f"{header(i)}\n{text}\n" for i, text in enumerate(texts))


@torch.no_grad()
def write_training_samples(
    model: torch.nn.Module, cfg: Config, tokenizer: Tokenizer, path: Path, device: torch.device, dtype: torch.dtype
) -> None:
    """Write ``cfg.sample.num_samples`` decoded samples of ``data.seq_len`` tokens to ``path`` (labels
    cycling over the classes, fixed seeds, so files of successive steps compare). Leaves the
    training RNGs untouched."""
    n, num_classes = cfg.sample.num_samples, cfg.data.num_classes or 0
    labels = [i % num_classes for i in range(n)] if num_classes else None
    seeds = [cfg.sample.seed + i for i in range(n)]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        tokens, start = sample_text(model, cfg, tokenizer, seeds, labels, device=device, dtype=dtype)
    texts = [tokenizer.decode(row[start:].tolist()) for row in tokens]
    path.parent.mkdir(parents=True, exist_ok=True)
    names = _class_names(cfg)

    def header(i: int) -> str:
        label = f", label {labels[i]} ({names[labels[i]]})" if labels else ""
        return f"==== {path.stem} sample {i} (seed {seeds[i]}{label}) ===="

    path.write_text(format_samples(texts, header), encoding="utf-8")
