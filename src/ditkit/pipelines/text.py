"""Text from a token DiT: masked diffusion (MDLM ancestral sampling, prompts, suffixes, infill,
semi-autoregressive windows beyond the training length), block diffusion (BD3-LM: block by block,
any length, KV cache over finished blocks) or the autoregressive baseline (KV cache).

    pipe = ditkit.load("results/sums")
    out = pipe("12+", num_inference_steps=24, generator=torch.Generator().manual_seed(0))
    print(out.texts[0])

Time convention (docs/architecture.md): the masked objective calls the network with ``1000 * t``,
``t in [0, 1]`` (1 = all masked); the autoregressive one with ``t = 0``. The driver of each
objective family (``masked``, ``block``, ``autoregressive``) lives in ``_DRIVERS`` below.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ditkit.config import Config, ConfigError
from ditkit.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from ditkit.fileio import write_text
from ditkit.models.caching import attach_step_cache, make_step_cache
from ditkit.pipelines.base import GeneratorArg, Pipeline, generator_slice, resolve_generators
from ditkit.progress import announce_total, sampling_progress
from ditkit.registry import PIPELINES, SAMPLERS
from ditkit.samplers.guidance import classifier_free_guidance
from ditkit.samplers.masked import canvas

__all__ = ["TextPipeline", "TextPipelineOutput", "encode_infill", "load_checkpoint_tokenizer", "format_samples",
           "TokenTrajectory"]


def load_checkpoint_tokenizer(ckpt_dir: str | Path) -> Tokenizer:
    """The tokenizer saved in a checkpoint directory (or, failing that, in its run directory)."""
    ckpt_dir = Path(ckpt_dir)
    for where in (ckpt_dir, ckpt_dir.parent.parent):
        if (where / TOKENIZER_FILE).is_file():
            return load_tokenizer(where)
    raise ConfigError(f"{ckpt_dir} holds no {TOKENIZER_FILE}: it was not trained on text by ditkit")


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    try:
        return tokenizer.encode(text) if text else []
    except ValueError as err:
        raise ConfigError(f"cannot encode {text!r}: {err}") from None


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


def format_samples(texts: Sequence[str], header: Callable[[int], str]) -> str:
    """Samples one after another, each under ``header(i)``, for a human-readable ``.txt``."""
    return "".join(f"{header(i)}\n{text}\n" for i, text in enumerate(texts))


class TokenTrajectory:
    """Records the token state of a batch at ``points`` steps spread evenly over a sampling run
    (``trajectory_indices``), fed by the samplers' callbacks. Positions not yet generated are the
    mask id (the tokenizer shows it as its ``mask_text``): masked diffusion shows tokens being
    revealed, block diffusion the blocks filling in turn, autoregressive models the prefix growing."""

    def __init__(self, points: int, mask_id: int) -> None:
        self.points, self.mask_id = points, mask_id
        self.indices: set[int] = set()
        self.steps: list[int] = []
        self.rows: list[Tensor] = []
        self.last_step = 0  # the last step the sampler reported

    def plan(self, total_steps: int) -> None:
        """The run takes (at most) ``total_steps`` sampler steps: record at ``points`` of them."""
        from ditkit.pipelines.base import trajectory_indices

        self.indices = set(trajectory_indices(max(total_steps, 1), self.points))

    def record(self, step: int, tokens: Tensor) -> None:
        """``tokens`` ``(B, l)``: the state after sampler step ``step`` (kept when it is planned)."""
        self.last_step = step
        if step in self.indices:
            self.steps.append(step)
            self.rows.append(tokens.detach().cpu().clone())

    def finish(self, final: Tensor) -> Tensor:
        """``(B, K, L)`` int64: the recorded rows padded with the mask id to ``final``'s length
        ``L``; the last row is always ``final`` (added at the last reported step when the run
        stopped before the last planned one, e.g. block diffusion at an end-of-text token)."""
        final = final.detach().cpu()
        if not self.rows or self.rows[-1].shape != final.shape or not torch.equal(self.rows[-1], final):
            self.steps.append(self.last_step)
            self.rows.append(final)
        padded = []
        for row in self.rows:
            row = row[:, : final.shape[1]]
            fill = torch.full((row.shape[0], final.shape[1] - row.shape[1]), self.mask_id, dtype=row.dtype)
            padded.append(torch.cat([row, fill], 1))
        return torch.stack(padded, 1)


@dataclass
class TextPipelineOutput:
    """texts: decoded samples; tokens: ``(N, L)`` int64 (``tokens[:, start:]`` is the text);
    labels / seeds per sample (seeds None with a caller's generator); metadata: entries that
    identify the run and the sampling; class_names of the labels. With ``trajectory_points``:
    ``trajectory[i]`` is sample ``i``'s text after each step in ``trajectory_steps`` (still-masked
    positions shown as the tokenizer's ``mask_text``, ``_`` by default; the last entry is
    ``texts[i]``) and ``trajectory_tokens`` ``(N, K, L)`` the tokens (mask id where masked)."""

    texts: list[str]
    tokens: Tensor
    start: int
    labels: Optional[list[int]]
    seeds: Optional[list[int]]
    metadata: dict[str, str]
    class_names: list[str] = field(default_factory=list)
    trajectory: Optional[list[list[str]]] = None
    trajectory_steps: list[int] = field(default_factory=list)
    trajectory_tokens: Optional[Tensor] = None

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per sample: index, seed, label (and its name), text."""
        rows = []
        for i, text in enumerate(self.texts):
            row: dict[str, Any] = {"index": i, "seed": None if self.seeds is None else self.seeds[i], "text": text}
            if self.labels is not None:
                row["label"] = self.labels[i]
                if self.labels[i] < len(self.class_names):
                    row["class_name"] = self.class_names[self.labels[i]]
            rows.append(row)
        return rows

    def header(self, i: int) -> str:
        row = self.records()[i]
        label = f", label {row['label']}" if "label" in row else ""
        return f"==== sample {i} (seed {row['seed']}{label}) ===="

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``samples.txt`` (metadata lines, then each sample under a header) and
        ``samples.jsonl`` (a metadata line, then one record per sample); with a trajectory also
        ``trajectory.txt`` (per sample, one line per recorded step, newlines shown as ``\\n``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        info = "".join(f"# {k}: {v}\n" for k, v in self.metadata.items())
        write_text(out / "samples.txt", info + format_samples(self.texts, self.header))
        lines = [{"metadata": self.metadata}, *self.records()]
        write_text(out / "samples.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in lines))
        written = [out / "samples.txt", out / "samples.jsonl"]
        if self.trajectory is not None:
            width = len(str(max(self.trajectory_steps, default=0) + 1))
            lines = [f"# {k}: {v}" for k, v in self.metadata.items()]
            lines.append(f"# trajectory: each sample after sampler steps {' '.join(str(k + 1) for k in self.trajectory_steps)} "
                         "(masked or not yet generated positions as the tokenizer's mask text; newlines as \\n)")
            for i, rows in enumerate(self.trajectory):
                lines.append(self.header(i))
                lines += [f"step {k + 1:>{width}} | " + text.replace("\\", "\\\\").replace("\n", "\\n")
                          for k, text in zip(self.trajectory_steps, rows)]
            write_text(out / "trajectory.txt", "\n".join(lines) + "\n")
            written.append(out / "trajectory.txt")
        return written


@dataclass
class _Request:
    """A checked text request: the token layout every driver needs."""

    kind: str
    steps: int
    temperature: float
    top_k: Optional[int]
    remasking: str
    start: int  # 1 when a separator leads the sample, else 0
    length: int  # total tokens including the lead
    prefix: list[int]
    tail: list[int]
    template: Optional[list[int]]
    stride: Optional[int]
    kv_cache: bool = True  # block and autoregressive models: reuse the keys/values of finished tokens
    remdm_eta: float = 0.0  # masked / block models: ReMDM remasking strength (0: off)
    planned: int = 0  # sampler steps of one batch (``_planned_steps``): trajectory plans, progress totals


@PIPELINES.register("text")
class TextPipeline(Pipeline):
    """Masked-diffusion or autoregressive text DiT (see the module docstring)."""

    modality = "text"

    def __init__(self, model: torch.nn.Module, cfg: Config, *, tokenizer: Optional[Tokenizer] = None, **kwargs: Any) -> None:
        super().__init__(model, cfg, **kwargs)
        if tokenizer is None:
            if self.checkpoint is None:
                raise ConfigError("a text pipeline on a model in memory needs its tokenizer")
            tokenizer = load_checkpoint_tokenizer(self.checkpoint.dir)
        self.tokenizer = tokenizer

    @classmethod
    def check_extras(cls, cfg: Config, tokenizer: Optional[Tokenizer] = None, **extras: Any) -> None:
        super().check_extras(cfg, **extras)

    @property
    def sampler_name(self) -> str:
        """The one sampler of the objective's family (``ancestral``, ``block`` or ``autoregressive``)."""
        return SAMPLERS.names(family=self.objective.family)[0]

    def _request(
        self, prompt: Optional[str], suffix: Optional[str], infill: Optional[str], mask_char: str,
        num_tokens: Optional[int], steps: Optional[int], temperature: Optional[float], top_k: Optional[int],
        remasking: Optional[str], stride: Optional[int], at_document_start: bool,
    ) -> _Request:
        cfg, s, tok = self.cfg, self.cfg.sample, self.tokenizer
        kind, seq_len = cfg.objective.kind, cfg.data.seq_len
        steps = s.num_sampling_steps if steps is None else steps
        temperature = s.temperature if temperature is None else temperature
        top_k = s.top_k if top_k is None else top_k
        remasking = s.remasking if remasking is None else remasking
        if steps < 1:
            raise ConfigError(f"--num-sampling-steps {steps}: must be at least 1")
        if temperature < 0:
            raise ConfigError(f"--temperature {temperature}: use a value >= 0 (0 = greedy)")
        if kind == "autoregressive" and (suffix or infill):
            raise ConfigError("an autoregressive model writes left to right: --suffix and --infill need a masked model")
        if kind == "block" and suffix:
            raise ConfigError("a block-diffusion model writes block by block: --suffix needs a masked model (--infill works)")
        if kind in ("masked", "block") and top_k is not None:
            raise ConfigError("--top-k applies to the autoregressive sampler only")
        if infill is not None and (prompt or suffix):
            raise ConfigError("--infill is the whole template: put the prompt and suffix text into it")
        lead = [tok.sep_id] if at_document_start and (prompt or infill) else []
        start = len(lead)
        template, prefix, tail = None, [], []
        if infill is not None:
            template = lead + encode_infill(tok, infill, mask_char)
            if num_tokens is not None and num_tokens != len(template) - start:
                raise ConfigError(f"--num-tokens {num_tokens} differs from the {len(template) - start} tokens of --infill")
            length = len(template)
        else:
            prefix = lead + _encode(tok, prompt or "")
            tail = _encode(tok, suffix or "")
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
        req = _Request(kind, steps, temperature, top_k, remasking, start, length, prefix, tail, template, stride)
        req.planned = _planned_steps(req, seq_len, getattr(tok, "mask_id", None), getattr(self.objective, "block_size", None))
        return req

    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[str] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        generator: GeneratorArg = None,
        *,
        num_samples: Optional[int] = None,
        class_labels: Optional[Sequence[int | str]] = None,
        suffix: Optional[str] = None,
        infill: Optional[str] = None,
        mask_char: str = "_",
        num_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        remasking: Optional[str] = None,
        stride: Optional[int] = None,
        at_document_start: bool = True,
        kv_cache: bool = True,
        remdm_eta: Optional[float] = None,
        seed: Optional[int] = None,
        batch_size: int = 64,
        progress: Optional[Callable[[int], None]] = None,
        allow_untrained_uncond: bool = False,
        cache: Optional[str] = None,
        trajectory_points: int = 0,
    ) -> TextPipelineOutput:
        """Draw ``num_samples`` texts (default: one per label, or 1).

        Masked models: MDLM ancestral sampling on a canvas of ``num_tokens`` (default the training
        ``seq_len``) with the ``prompt`` fixed at the start and the ``suffix`` at the end, or an
        ``infill`` template (``mask_char`` marks each position to fill); longer than ``seq_len``,
        semi-autoregressive windows advancing by ``stride`` (default half a window).
        Block diffusion: block by block after the prompt (an ``infill`` template's fixed tokens are
        seen by their own and later blocks), any ``num_tokens``. Autoregressive: next-token
        sampling after the prompt (``temperature``, ``top_k``). ``kv_cache`` (block and
        autoregressive models): finished tokens' keys and values are computed once; off, the
        context is re-run for every network call (same tokens, slower). ``remdm_eta`` > 0 (masked
        and block models, random reveal order): ReMDM remasking of generated tokens (capped
        schedule, ``samplers.masked.ancestral``); default ``sample.remdm_eta`` when the config has it, else 0. With
        ``at_document_start`` a separator precedes the prompt/template, as a document begins in
        the packed training stream. ``class_labels`` with ``guidance_scale != 1``: classifier-free
        guidance on the logits. ``progress(1)`` is called once per network call. Options left None
        come from the checkpoint's ``sample`` section; sample ``i`` uses seed ``seed + i`` unless
        ``generator`` is given. ``cache`` (masked models): step caching of the block stack between
        network calls, ``"fora:N"`` or ``"teacache:T"`` (``ditkit.models.caching``; None = off),
        recorded in the metadata. ``trajectory_points`` > 0: also return each sample's text at that
        many sampler steps spread evenly over the run (``TextPipelineOutput.trajectory``; the steps
        count over every window / block / token of the run). Raises ``ConfigError`` for impossible
        requests.
        """
        cfg = self.cfg
        labels, n = self.resolve_labels(class_labels, num_samples, default_count=1)
        scale = cfg.sample.cfg_scale if guidance_scale is None else guidance_scale
        self.check_guidance(scale if labels is not None else 1.0, allow_untrained_uncond)
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
        req = self._request(prompt, suffix, infill, mask_char, num_tokens, num_inference_steps, temperature, top_k,
                            remasking, stride, at_document_start)
        req.kv_cache = kv_cache
        req.remdm_eta = float(getattr(cfg.sample, "remdm_eta", 0.0) if remdm_eta is None else remdm_eta)
        if req.remdm_eta < 0 or (req.remdm_eta > 0 and (req.kind == "autoregressive" or req.remasking != "random")):
            raise ConfigError(f"--remdm-eta {req.remdm_eta}: use a value >= 0, on a masked or block model with --remasking random")
        if trajectory_points < 0:
            raise ConfigError(f"--trajectory-points {trajectory_points}: use a count >= 1 (0: no trajectory)")
        seed = cfg.sample.seed if seed is None else seed
        seeds, generators = resolve_generators(n, seed, generator)
        step_cache = make_step_cache(cache)
        if step_cache is not None and req.kind != "masked":
            raise ConfigError(f"--cache {cache}: step caching applies to masked text models; drop it for {req.kind} sampling")
        attach_step_cache(self.model, step_cache)  # refuses a model without the hook before any work
        forward = self.forward_fn()
        if progress is not None:
            inner = forward

            def forward(x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:  # counts network calls
                progress(1)
                return inner(x, t, y)

        announce_total(progress, req.planned * math.ceil(n / batch_size))
        outputs, trajectories, trajectory_steps = [], [], []
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            y = None
            if self.num_classes and labels is not None:
                y = torch.tensor(labels[lo:hi], dtype=torch.long, device=self.device)
            elif self.num_classes:  # a conditional model needs a label: the null class samples unconditionally
                y = torch.full((hi - lo,), self.num_classes, dtype=torch.long, device=self.device)
            if y is not None and labels is not None and scale != 1.0:
                net = classifier_free_guidance(forward, y, scale, null_class=self.num_classes)
            else:
                net = lambda x, t, y=y: forward(x, t, y)  # noqa: E731
            record = TokenTrajectory(trajectory_points, self.tokenizer.mask_id) if trajectory_points else None
            with attach_step_cache(self.model, step_cache):  # reset per batch: one trajectory each
                drawn = _DRIVERS[self.objective.family](self, net, req, hi - lo, generator_slice(generators, lo, hi),
                                                        trajectory=record).cpu()
            outputs.append(drawn)
            if record is not None:
                trajectories.append(record.finish(drawn))
                trajectory_steps = trajectory_steps or record.steps
        tokens = torch.cat(outputs)
        texts = [self.tokenizer.decode(row[req.start:].tolist()) for row in tokens]
        if req.kind == "autoregressive":  # one network call per generated token
            steps = tokens.shape[1] - len(req.prefix)
        else:
            steps = req.steps
        metadata = self.provenance()
        metadata.update({
            "sampler": self.sampler_name, "num_sampling_steps": str(steps), "cfg_scale": str(scale),
            "temperature": str(req.temperature), "seed": str(seed) if seeds is not None else "caller's generator",
        })
        if req.remdm_eta > 0:
            metadata["remdm_eta"] = str(req.remdm_eta)
        for key, value in (("prompt", prompt), ("suffix", suffix), ("infill", infill)):
            if value:
                metadata[key] = str(value)
        if step_cache is not None:
            metadata["cache"] = step_cache.spec
            metadata["cache_reuse"] = step_cache.summary()
        trajectory, trajectory_tokens = None, None
        if trajectories:
            trajectory_tokens = torch.cat(trajectories)  # (N, K, L)
            trajectory = [[self.tokenizer.decode(row[req.start:].tolist()) for row in rows] for rows in trajectory_tokens]
            metadata["trajectory_steps"] = " ".join(map(str, trajectory_steps))  # 0-based, as images and audio
        return TextPipelineOutput(texts, tokens, req.start, labels, seeds, metadata, list(self.class_names), trajectory,
                                  trajectory_steps, trajectory_tokens)

    # ---- ditkit sample ----------------------------------------------------------------------------
    @classmethod
    def add_cli_arguments(cls, parser: Any) -> None:
        super().add_cli_arguments(parser)  # --lora
        parser.add_argument("--prompt", help="text every sample starts with (placed at the start of a document)")
        parser.add_argument("--suffix", help="masked models: text every sample ends with")
        parser.add_argument("--infill", metavar="TEMPLATE", help="masked models: fill each --mask-char of TEMPLATE, e.g. '12+__=19'")
        parser.add_argument("--mask-char", help="the character marking positions to fill in --infill (default _)")
        parser.add_argument("--num-tokens", type=int, help="tokens per sample (default: the training seq_len; longer: semi-autoregressive)")
        parser.add_argument("--stride", type=int, help="semi-autoregressive: new tokens per window (default: half the window)")
        parser.add_argument("--temperature", type=float, help="default: the checkpoint's sample.temperature; 0 is greedy")
        parser.add_argument("--top-k", type=int, help="autoregressive models: sample among the k most likely tokens")
        parser.add_argument("--remasking", choices=["random", "low_confidence"], help="masked models: which positions to reveal")
        parser.add_argument("--no-document-start", action="store_true", help="no separator before --prompt / --infill")
        parser.add_argument("--no-kv-cache", action="store_true", help="block / autoregressive models: re-run the context every call")
        parser.add_argument("--remdm-eta", type=float, help="masked / block models: ReMDM remasking strength (e.g. 0.02; 0 off)")
        parser.add_argument("--cache", metavar="SPEC",
                            help="masked models, step caching: fora:N or teacache:T (threshold); default none")
        cls.add_trajectory_arguments(parser)  # trajectory.txt

    def cli_call(self, args: Any, distributed: bool = False) -> TextPipelineOutput:
        if distributed:
            raise ConfigError("text sampling runs in one process: drop torchrun")
        if args.sampler not in (None, "auto", self.sampler_name):
            raise ConfigError(f"--sampler {args.sampler} does not fit this {self.cfg.objective.kind} text model: use {self.sampler_name}")
        with sampling_progress("network calls") as progress:
            return self(
                args.prompt, args.num_sampling_steps, args.cfg_scale, num_samples=args.num_samples or 16,
                class_labels=args.class_labels, suffix=args.suffix, infill=args.infill, mask_char=args.mask_char or "_",
                num_tokens=args.num_tokens, temperature=args.temperature, top_k=args.top_k, remasking=args.remasking,
                stride=args.stride, at_document_start=not args.no_document_start,
                kv_cache=not getattr(args, "no_kv_cache", False), remdm_eta=getattr(args, "remdm_eta", None),
                seed=args.seed,
                batch_size=args.batch_size, allow_untrained_uncond=args.allow_untrained_uncond, progress=progress,
                cache=getattr(args, "cache", None), trajectory_points=self.trajectory_points_of(args),
            )

    def cli_summary(self, output: TextPipelineOutput) -> str:
        meta = output.metadata
        return (format_samples(output.texts, output.header)
                + f"{len(output.texts)} samples ({meta['sampler']}, {meta['num_sampling_steps']} steps, "
                f"cfg {meta['cfg_scale']}) from {meta['checkpoint']}")

    def write_training_samples(self, path_stem: Path) -> Path:
        """``sample.num_samples`` decoded samples of ``data.seq_len`` tokens at ``path_stem.txt``
        (labels cycling over the classes, fixed seeds, so files of successive steps compare);
        leaves the caller's RNGs as they were."""
        n, k = self.cfg.sample.num_samples, self.num_classes
        labels = [i % k for i in range(n)] if k else None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            out = self(num_samples=n, class_labels=labels, at_document_start=True, allow_untrained_uncond=True)
        path = path_stem.with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        names = self.class_names

        def header(i: int) -> str:
            label = f", label {labels[i]} ({names[labels[i]]})" if labels else ""
            return f"==== {path.stem} sample {i} (seed {self.cfg.sample.seed + i}{label}) ===="

        write_text(path, format_samples(out.texts, header))
        return path


# ---- the drivers: one per objective family ----------------------------------------------------------


def _drive_masked(pipe: TextPipeline, net: Callable, req: _Request, batch: int, generators: Any,
                  trajectory: Optional[TokenTrajectory] = None) -> Tensor:
    from ditkit.samplers.masked import semi_autoregressive

    device, seq_len, mask_id = pipe.device, pipe.cfg.data.seq_len, pipe.tokenizer.mask_id
    denoiser = pipe.objective.denoiser(net)
    ancestral = SAMPLERS.get("ancestral", family="masked").obj
    options = dict(remasking=req.remasking, cache=not getattr(pipe.model, "time_conditioning", True),
                   temperature=req.temperature, generator=generators)
    if req.remdm_eta > 0:  # only then, so that the plain call stays the recorded one
        options["remdm_eta"] = req.remdm_eta
    one_window = req.template is not None or req.length <= seq_len
    if trajectory is not None:
        trajectory.plan(req.planned)  # window after window: the steps count over all of them
    if trajectory is not None and one_window:
        options["callback"] = lambda i, x, _x0: trajectory.record(i, x)
    if req.template is not None:
        x = torch.tensor(req.template, dtype=torch.long, device=device).expand(batch, -1).clone()
        return ancestral(denoiser, x, req.steps, mask_id=mask_id, **options)
    if one_window:
        x = canvas(req.length, mask_id, batch, prefix=torch.tensor(req.prefix, dtype=torch.long) if req.prefix else None,
                   suffix=torch.tensor(req.tail, dtype=torch.long) if req.tail else None, device=device)
        return ancestral(denoiser, x, req.steps, mask_id=mask_id, **options)
    if trajectory is not None:
        options["step_callback"] = trajectory.record
    prefix = torch.tensor(req.prefix, dtype=torch.long, device=device).expand(batch, -1)
    return semi_autoregressive(denoiser, prefix, req.length, window=seq_len, stride=req.stride, num_steps=req.steps,
                               mask_id=mask_id, **options)


def _drive_autoregressive(pipe: TextPipeline, net: Callable, req: _Request, batch: int, generators: Any,
                          trajectory: Optional[TokenTrajectory] = None) -> Tensor:
    from ditkit.models.text_dit import KVCache
    from ditkit.samplers.autoregressive import cached_next_token

    prefix = torch.tensor(req.prefix, dtype=torch.long, device=pipe.device).expand(batch, -1)
    sampler = SAMPLERS.get("autoregressive", family="autoregressive").obj
    options: dict[str, Any] = dict(temperature=req.temperature, top_k=req.top_k, generator=generators)
    if trajectory is not None:  # the prefix growing one token per step
        trajectory.plan(req.planned)
        options["callback"] = trajectory.record
    if not (req.kv_cache and hasattr(pipe.model, "use_kv_cache")):
        next_token = pipe.objective.denoiser(net, pipe.cfg.data.seq_len)
        return sampler(next_token, prefix, req.length - prefix.shape[1], **options)
    with pipe.model.use_kv_cache(KVCache()) as cache:
        next_token = cached_next_token(net, cache, bos_id=pipe.objective.bos_id, context_len=pipe.cfg.data.seq_len)
        return sampler(next_token, prefix, req.length - prefix.shape[1], **options)


def _drive_block(pipe: TextPipeline, net: Callable, req: _Request, batch: int, generators: Any,
                 trajectory: Optional[TokenTrajectory] = None) -> Tensor:
    from ditkit.models.text_dit import KVCache

    objective, mask_id = pipe.objective, pipe.tokenizer.mask_id
    start = req.template if req.template is not None else req.prefix
    prefix = torch.tensor(start, dtype=torch.long, device=pipe.device).expand(batch, -1)
    sampler = SAMPLERS.get("block", family="block").obj
    step_callback = None
    if trajectory is not None:  # blocks fill in turn; planned over every block (fewer if it stops early)
        trajectory.plan(req.planned)
        step_callback = trajectory.record
    with pipe.model.use_kv_cache(KVCache(objective.block_size)) as cache:
        denoiser = objective.denoiser(net, cache, context_len=pipe.cfg.data.seq_len, use_cache=req.kv_cache)
        return sampler(denoiser, prefix, req.length - prefix.shape[1], block_size=objective.block_size,
                       num_steps=req.steps, mask_id=mask_id, remasking=req.remasking, temperature=req.temperature,
                       remdm_eta=req.remdm_eta, cache=not getattr(pipe.model, "time_conditioning", True),
                       generator=generators, step_callback=step_callback)


def _planned_steps(req: _Request, seq_len: int, mask_id: int, block_size: Optional[int]) -> int:
    """Sampler steps of one batch of ``req``: masked, ``steps`` per window (semi-autoregressive runs
    count every window ``semi_autoregressive`` will run); block diffusion, ``steps`` per block from
    the first to fill; autoregressive, one per generated token. Network calls are at most this many
    (masked models without time conditioning skip calls that would change nothing)."""
    if req.kind == "autoregressive":
        return req.length - len(req.prefix)
    if req.kind == "block":
        start = req.template if req.template is not None else req.prefix
        first = start.index(mask_id) if mask_id in start else len(start)
        return math.ceil((req.length - (first - first % block_size)) / block_size) * req.steps
    if req.template is not None or req.length <= seq_len:
        return req.steps
    windows, length = 0, len(req.prefix)
    while length < req.length:  # the windows semi_autoregressive will run
        keep = length if length < seq_len else seq_len - req.stride
        length += min(seq_len - keep, req.length - length)
        windows += 1
    return windows * req.steps


_DRIVERS: dict[str, Callable[..., Tensor]] = {
    "masked": _drive_masked, "block": _drive_block, "autoregressive": _drive_autoregressive,
}
