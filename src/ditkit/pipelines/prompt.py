"""Images from prompts: a text-to-image model (``T2I-*``, ``models/prompt_dit.py``).

    pipe = ditkit.load("results/shapes_captions")
    out = pipe("a small red circle", num_inference_steps=25, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), num_images_per_prompt=4)
    out.images[0].save("circle.png")        # out.prompts[i] is the prompt of image i

Classifier-free guidance (Ho & Salimans 2022) runs the prompt and the negative prompt (default the
empty caption, the null condition caption dropout trained) as one batch of 2B and returns
``uncond + s (cond - uncond)`` on the image channels. ``attention_maps=True`` also returns, per
image, the cross-attention of every caption token averaged over heads, layers and steps (DAAM, Tang
et al. 2022, arXiv 2210.04885); ``save`` writes them as one PNG strip per prompt, a map per word.

A run trained with a frozen pretrained encoder (``--text-encoder PATH``, ``data.text_encoder``)
encodes prompts with that folder, which must still hold the weights training recorded
(``data.text_encoder_sha256``): a missing or changed folder is a one-line ConfigError naming
``--text-encoder`` (``ditkit.load(run, text_encoder=NEW_PATH)`` / ``ditkit sample --text-encoder``
point to a moved copy). Runs with the jointly trained encoder read their caption tokenizer from the
checkpoint's ``text_tokenizer.json`` (older checkpoints: from the config).

Registered as the ``text_to_image`` pipeline; the model family's ``pipeline`` meta selects it.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ditkit.builders.dit import model_input_shape
from ditkit.config import Config, ConfigError
from ditkit.data.captions import caption_tokenizer, caption_tokenizer_from_dict, word_spans
from ditkit.models.text_encoder import PromptCondition
from ditkit.fileio import atomic_path
from ditkit.media import display_scale, heat_rgb, make_grid, save_png, to_pil, to_uint8
from ditkit.pipelines.base import GeneratorArg
from ditkit.pipelines.denoising import BatchHook, TrajectoryRecorder
from ditkit.pipelines.image import ImagePipeline, ImagePipelineOutput
from ditkit.progress import announce_total, sampling_progress
from ditkit.registry import PIPELINES

__all__ = ["PromptPipeline", "PromptPipelineOutput", "read_prompt_file", "caption_strip", "load_frozen_encoder", "FrozenPromptTokenizer"]


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 prompt file; ConfigError (one line) for a missing or non-UTF-8 file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--prompt-file {path} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ConfigError(f"--prompt-file {path} is not UTF-8 text (byte {err.start}): re-save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompt-file {path} holds no prompt (one per non-empty line)")
    return prompts


def caption_strip(pixels: np.ndarray, captions: Sequence[str], row_height: int, text_height: int = 12) -> np.ndarray:
    """``pixels`` (H, W, C) uint8, a grid of ``len(captions)`` rows of ``row_height`` pixels ->
    the grid with each row followed by a black band holding its caption in white."""
    font = ImageFont.load_default()
    rows = []
    for r, caption in enumerate(captions):
        rows.append(pixels[r * row_height: (r + 1) * row_height])
        band = Image.new("RGB", (pixels.shape[1], text_height), (0, 0, 0))
        ImageDraw.Draw(band).text((2, 0), caption, fill=(255, 255, 255), font=font)
        text = np.asarray(band)
        rows.append(text[..., :1] if pixels.shape[-1] == 1 else text)
    rows.append(pixels[len(captions) * row_height:])
    return np.concatenate(rows, axis=0)


@dataclass
class PromptPipelineOutput(ImagePipelineOutput):
    """``ImagePipelineOutput`` plus ``prompts`` / ``negative_prompts`` (one per image),
    ``num_images_per_prompt`` and ``attention_maps``: per image a list of ``(word, map (H, W) in
    [0, 1])`` or None."""

    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    num_images_per_prompt: int = 1
    attention_maps: Optional[list[list[tuple[str, torch.Tensor]]]] = None

    def sample_metadata(self, index: int) -> dict[str, str]:
        meta = super().sample_metadata(index)
        meta.pop("label", None)
        meta["prompt"] = self.prompts[index]
        meta["negative_prompt"] = self.negative_prompts[index]
        return meta

    def save(self, out_dir: str | Path, *, nrow: Optional[int] = None, npz: bool = False) -> list[Path]:
        """``grid.png`` (one row per prompt, the prompt under its row), one PNG per image (prompt in
        the metadata), ``attention_NN.png`` strips when maps were asked for."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pixels = to_uint8(self.tensors)
        written = []
        for i in range(len(pixels)):
            save_png(pixels[i], out / f"{i:06d}.png", self.sample_metadata(i))
            written.append(out / f"{i:06d}.png")
        save_png(self.grid(nrow), out / "grid.png", {**self.metadata, "prompts": " | ".join(dict.fromkeys(self.prompts))})
        written.insert(0, out / "grid.png")
        if npz:
            with atomic_path(out / "samples.npz") as tmp:
                np.savez(tmp, arr_0=pixels)
            written.append(out / "samples.npz")
        for p, i in enumerate(range(0, len(pixels), self.num_images_per_prompt)):
            if self.attention_maps is None:
                break
            path = out / f"attention_{p:02d}.png"
            save_png(self.attention_strip(i), path, {**self.sample_metadata(i),
                                                     "layout": "the image, then one cross-attention map per word (DAAM)"})
            written.append(path)
        return written

    def grid(self, nrow: Optional[int] = None) -> np.ndarray:
        """(H', W', C) uint8: ``nrow`` images per row (default: the images of one prompt), the prompt
        written under each row."""
        k = nrow or self.num_images_per_prompt
        grid = make_grid(self.tensors, nrow=k, scale=display_scale(self.tensors.shape[-1]))
        row_height = (grid.shape[0] - 2) // math.ceil(len(self.tensors) / k)  # make_grid pads 2 pixels
        return caption_strip(grid, self.prompts[::k] if k == self.num_images_per_prompt else [], row_height)

    def attention_strip(self, index: int, scale: int = 4) -> np.ndarray:
        """(H', W', 3) uint8: image ``index``, then a heat map per prompt word, each word written under its map."""
        assert self.attention_maps is not None
        image = torch.from_numpy(to_uint8(self.tensors[index: index + 1])[0]).float() / 255  # (H, W, C)
        if image.shape[-1] == 1:
            image = image.expand(-1, -1, 3)
        tiles, words = [image], [""]
        for word, heat in self.attention_maps[index]:
            tiles.append(heat_rgb(heat))
            words.append(word)
        size = image.shape[0] * scale
        strip = Image.new("RGB", (len(tiles) * (size + 2), size + 12), (0, 0, 0))
        draw = ImageDraw.Draw(strip)
        for j, (tile, word) in enumerate(zip(tiles, words)):
            pic = Image.fromarray((tile.clamp(0, 1) * 255).byte().numpy()).resize((size, size), Image.Resampling.NEAREST)
            strip.paste(pic, (j * (size + 2), 0))
            draw.text((j * (size + 2) + 2, size), word, fill=(255, 255, 255), font=ImageFont.load_default())
        return np.asarray(strip)


class PromptConditioning:
    """What every prompt pipeline (text-to-image, text-to-video) shares, mixed in before its
    modality's pipeline: the prompt model's tokenizer (or frozen encoder) loaded with the
    checkpoint, prompt encoding with the limit named, the prompt/negative-prompt lists and the
    guidance check against the empty caption."""

    def __init__(self, model: torch.nn.Module, cfg: Config, *, text_encoder: Optional[str | Path | Any] = None,
                 tokenizer: Optional[Any] = None, **kwargs: Any) -> None:
        super().__init__(model, cfg, **kwargs)
        self.encoder: Any = None  # a frozen pretrained encoder (FrozenEncoder), or None: the model's own
        if cfg.data.text_encoder:
            self.encoder = text_encoder if isinstance(text_encoder, torch.nn.Module) else load_frozen_encoder(
                cfg, text_encoder, self.device)
            self.tokenizer = FrozenPromptTokenizer(self.encoder)
            return
        self.tokenizer = tokenizer if tokenizer is not None else self._joint_tokenizer()  # given: the training loop's
        vocab = self.model.text_encoder.vocab_size
        if self.tokenizer.vocab_size > vocab or self.tokenizer.pad_id != self.model.pad_id:
            raise ConfigError(f"the caption tokenizer ({self.tokenizer.vocab_size} ids) does not fit the model's text "
                              f"encoder ({vocab} ids): the checkpoint's data section does not match its weights")

    def _joint_tokenizer(self) -> Any:
        """The jointly trained encoder's tokenizer: the checkpoint's ``text_tokenizer.json`` (written
        beside its config.json), else a function of the config (see builders/prompt.py)."""
        from ditkit.data.tokenizers import TOKENIZER_FILE

        if self.checkpoint is not None:
            for where in (self.checkpoint.dir, self.checkpoint.dir.parent.parent):
                if (where / TOKENIZER_FILE).is_file():
                    return caption_tokenizer_from_dict(json.loads((where / TOKENIZER_FILE).read_text(encoding="utf-8")))
        return caption_tokenizer(self.cfg.data)

    @classmethod
    def check_extras(cls, cfg: Config, text_encoder: Optional[Any] = None, **extras: Any) -> None:
        super().check_extras(cfg, **extras)
        if text_encoder is not None and not cfg.data.text_encoder:
            raise ConfigError(f"--text-encoder {text_encoder}: this checkpoint trained its own text encoder; drop --text-encoder")

    def provenance(self) -> dict[str, str]:
        """The base provenance, plus the frozen text encoder (folder and weights' sha256) when there is one."""
        meta = super().provenance()
        if self.encoder is not None:
            meta["text_encoder"] = self.encoder.path
            meta["text_encoder_sha256"] = self.encoder.weights_sha256
        return meta

    @property
    def max_prompt_tokens(self) -> int:
        """Tokens a prompt may have ([BOS] not counted; a frozen encoder's limit counts its special tokens)."""
        if self.encoder is not None:
            return int(self.encoder.max_length)
        return self.tokenizer.max_length - 1

    def encode_prompts(self, prompts: Sequence[str], strict: bool = False, what: str = "prompt") -> Any:
        """Token ids (B, L) int64 on the pipeline's device, or with a frozen encoder its
        ``PromptCondition`` (states (B, L, D)). ConfigError for a non-string or empty prompt;
        over-long prompts are truncated with a warning naming the limit (ConfigError with ``strict``);
        words outside a word vocabulary are read as ``[UNK]`` with a warning naming them."""
        for p in prompts:
            if not isinstance(p, str):
                raise ConfigError(f"{what} {p!r} is not a string")
            if what == "prompt" and not p.strip():
                raise ConfigError("empty prompt: describe what to draw, e.g. --prompt \"a small red circle\"")
        if self.encoder is not None:
            self.encoder.strict = strict
            try:
                return self.encoder(list(prompts)).to(self.device)
            except ConfigError as err:
                raise ConfigError(f"{what}: {err}") from None
        try:
            ids, _ = self.tokenizer(list(prompts), strict=strict)
        except ConfigError as err:
            raise ConfigError(f"{what}: {err}") from None
        unknown_words = getattr(self.tokenizer, "unknown_words", None)  # word vocabularies only
        unknown = sorted({w for p in prompts for w in unknown_words(p)}) if unknown_words is not None else []
        if unknown:
            warnings.warn(f"{what} word(s) this model's text encoder never saw in training, read as [UNK]: "
                          f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''} "
                          f"(its vocabulary: {self.tokenizer.vocab_size - 3} words)", stacklevel=3)
        return ids.to(self.device)

    def check_prompt_guidance(self, scale: float, allow_untrained_uncond: bool) -> None:
        """Refuse guidance when caption dropout never trained the empty-caption branch."""
        if scale == 1.0 or getattr(self.model, "caption_dropout", 0.1) > 0:
            return
        message = (f"guidance scale {scale} guides against the empty caption, which this model never trained "
                   "(data.caption_dropout = 0): use --guidance-scale 1 or retrain with caption dropout")
        if not allow_untrained_uncond:
            raise ConfigError(message + "; --allow-untrained-uncond samples anyway")
        warnings.warn(message, stacklevel=3)

    def check_plan_guidance(self, scale: float, labels: Optional[list[int]], allow_untrained_uncond: bool) -> None:
        """A prompt model guides against the empty caption (``check_prompt_guidance``)."""
        self.check_prompt_guidance(scale, allow_untrained_uncond)

    @staticmethod
    def prompt_lists(prompt: str | Sequence[str], negative_prompt: Optional[str | Sequence[str]],
                     per_prompt: int, what: str = "images") -> tuple[list[str], list[str], list[str]]:
        """``(prompts, expanded prompts, expanded negative prompts)``: each prompt repeated
        ``per_prompt`` times (prompt-major), the negative prompt (default the empty caption) one
        string or one per prompt. ConfigError for no prompt, a count under 1 or a list of negative
        prompts of another length."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ConfigError("no prompt given: pass a string or a list of strings")
        if per_prompt < 1:
            raise ConfigError(f"--num-{what}-per-prompt {per_prompt}: must be at least 1")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ConfigError(f"negative_prompt: got {len(negatives)} for {len(prompts)} prompts; give one or one per prompt")
        return (prompts, [p for p in prompts for _ in range(per_prompt)],
                [q for q in negatives for _ in range(per_prompt)])

    def encode_prompt_pair(self, prompts: Sequence[str], negatives: Sequence[str], strict: bool = False) -> tuple[Any, Any]:
        """``(prompts, negative prompts)`` encoded (``encode_prompts``); token ids are padded to one
        length so the two halves of a guided batch concatenate."""
        ids = self.encode_prompts(prompts, strict)
        neg_ids = self.encode_prompts(negatives, strict, what="negative prompt")
        if isinstance(ids, PromptCondition):
            return ids, neg_ids
        length = max(ids.shape[1], neg_ids.shape[1])
        pad = self.tokenizer.pad_id
        return (torch.nn.functional.pad(ids, (0, length - ids.shape[1]), value=pad),
                torch.nn.functional.pad(neg_ids, (0, length - neg_ids.shape[1]), value=pad))

    def word_attention_maps(self, recorder: "AttentionMaps", texts: Sequence[str], size: int,
                            frames: Optional[int] = None) -> Optional[list[list[tuple[str, torch.Tensor]]]]:
        """Per text, ``[(word, heat)]`` from what ``recorder`` gathered: the attention of the word's
        tokens summed, resized bilinearly to ``size`` px and scaled to [0, 1] over the whole image
        (heat ``(size, size)``) or, with ``frames``, the whole clip (heat ``(frames, size, size)``; a
        tubelet model's ``F'`` maps are repeated to ``frames``). DAAM (Tang et al. 2022)."""
        if not recorder.maps:
            return None
        maps = torch.cat(recorder.maps)  # (N, *leading, g, g, L)
        word_maps = []
        for i, text in enumerate(texts):
            per_word = []
            for word, positions in self._word_spans(text):
                heat = maps[i][..., positions].sum(-1)  # (g, g) or (F', g, g)
                g = heat.shape[-1]
                heat = torch.nn.functional.interpolate(heat.reshape(-1, 1, g, g), size=(size, size), mode="bilinear",
                                                       align_corners=False)[:, 0]  # (F' or 1, size, size)
                heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
                if frames is None:
                    heat = heat[0]
                elif heat.shape[0] != frames:
                    heat = heat.repeat_interleave(frames // heat.shape[0], dim=0)
                per_word.append((word, heat))
            word_maps.append(per_word)
        return word_maps

    def _word_spans(self, prompt: str) -> list[tuple[str, list[int]]]:
        """``[(word, token positions)]`` of ``prompt`` as the encoder sees it: the joint tokenizer's
        (``word_spans``), or a frozen encoder's tokens with special tokens left out and WordPiece
        continuations (``##``) joined to their word."""
        if self.encoder is None:
            return word_spans(self.tokenizer, prompt)
        tok = self.encoder.tokenizer
        ids = tok(prompt, truncation=True, max_length=self.encoder.max_length)["input_ids"]
        special = set(getattr(tok, "all_special_ids", []))
        spans: list[tuple[str, list[int]]] = []
        for k, (i, piece) in enumerate(zip(ids, tok.convert_ids_to_tokens(ids))):
            if i in special:
                continue
            if piece.startswith("##") and spans:
                spans[-1] = (spans[-1][0] + piece[2:], spans[-1][1] + [k])
            else:
                spans.append((piece.lstrip("\u0120\u2581"), [k]))
        return spans

    @classmethod
    def add_prompt_arguments(cls, parser: Any) -> None:
        """The ``ditkit sample`` flags of every prompt model."""
        parser.add_argument("--prompt", help="prompt models: what to draw, e.g. \"a small red circle\"")
        parser.add_argument("--prompt-file", metavar="FILE", help="prompt models: one prompt per line (UTF-8)")
        parser.add_argument("--negative-prompt", help="prompt models: what to steer away from (replaces the empty prompt)")
        parser.add_argument("--strict", action="store_true", help="refuse prompts over the token limit instead of truncating")
        parser.add_argument("--attention-maps", action="store_true",
                            help="cross-attention prompt models: also write a cross-attention map per word (DAAM): "
                                 "attention_NN.png per prompt (images), NNNNNN_attention.png per clip (video, per frame)")
        parser.add_argument("--text-encoder", metavar="DIR",
                            help="prompt runs trained with a frozen encoder: where its folder is now (same weights)")

    @staticmethod
    def cli_prompts(args: Any) -> list[str]:
        """``--prompt`` then the lines of ``--prompt-file``; ConfigError when neither is given."""
        if args.prompt is None and args.prompt_file is None:
            raise ConfigError("a prompt checkpoint needs --prompt \"...\" or --prompt-file FILE")
        return ([args.prompt] if args.prompt is not None else []) + (
            read_prompt_file(args.prompt_file) if args.prompt_file else [])

    @classmethod
    def cli_extras(cls, args: Any) -> dict[str, Any]:
        path = getattr(args, "text_encoder", None)
        return {**super().cli_extras(args), **({"text_encoder": path} if path is not None else {})}  # type: ignore[misc]


class AttentionMaps(BatchHook):
    """Per-token cross-attention of the conditional prompts: for each batch, the maps the
    ``layers`` store on every network call (the first ``hi - lo`` rows: a guided call's conditional
    half), averaged over heads, layers and calls, one ``(B, *leading, g, g, L)`` tensor per batch in
    ``maps`` (``g * g`` tokens per image or frame, ``L`` prompt tokens; ``leading`` is ``()`` for
    images, ``(F',)`` for clips whose tokens are in (frame, patch) order)."""

    def __init__(self, layers: list[torch.nn.Module], leading: tuple[int, ...] = ()) -> None:
        self.layers, self.maps, self.leading = layers, [], tuple(leading)  # type: ignore[var-annotated]
        self._rows, self._sum, self._calls = 0, None, 0

    def _stores(self, on: bool) -> None:
        """Give every layer an empty store to fill (``on``), or none (it stops storing)."""
        for layer in self.layers:
            layer.attention_store = [] if on else None

    def wrap(self, forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def recording_forward(x: torch.Tensor, t: torch.Tensor, y: Any) -> torch.Tensor:
            result = forward(x, t, y)
            stored = [p[: self._rows].mean(1) for layer in self.layers for p in layer.attention_store]  # (B, N, L)
            total = torch.stack(stored).mean(0).cpu()
            self._sum = total if self._sum is None else self._sum + total
            self._calls += 1
            self._stores(True)
            return result

        return recording_forward

    @contextlib.contextmanager
    def batch(self, lo: int, hi: int) -> Iterator[None]:
        self._rows, self._sum, self._calls = hi - lo, None, 0
        self._stores(True)
        try:
            yield
        finally:
            self._stores(False)
        if self._sum is not None:
            g = int(math.isqrt(self._sum.shape[1] // math.prod(self.leading)))
            self.maps.append((self._sum / self._calls).view(hi - lo, *self.leading, g, g, -1))


@PIPELINES.register("text_to_image")
class PromptPipeline(PromptConditioning, ImagePipeline):
    """Text-to-image DiT: prompts in, images out (see the module docstring)."""

    modality = "text_to_image"
    supports_distributed = False

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | Sequence[str],
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        generator: GeneratorArg = None,
        *,
        negative_prompt: Optional[str | Sequence[str]] = None,
        num_images_per_prompt: int = 1,
        seed: Optional[int] = None,
        sampler: Optional[str] = None,
        eta: Optional[float] = None,
        timestep_spacing: Optional[str] = None,
        batch_size: int = 64,
        attention_maps: bool = False,
        strict: bool = False,
        allow_untrained_uncond: bool = False,
        progress: Optional[Callable[[int], None]] = None,
    ) -> PromptPipelineOutput:
        """Draw ``num_images_per_prompt`` images for each prompt (prompt-major order).

        ``prompt``: a string or a list. ``negative_prompt``: replaces the empty caption as the
        guidance reference (one string, or one per prompt). ``num_inference_steps``,
        ``guidance_scale`` (1 = none), ``sampler``, ``eta``, ``timestep_spacing`` default to the
        checkpoint's ``sample`` section. ``generator``: one ``torch.Generator`` or one per image;
        without it image ``i`` uses seed ``seed + i``. ``attention_maps``: per-word cross-attention
        maps (cross-attention models only). ``strict``: refuse prompts over the token limit instead
        of truncating them. Raises ConfigError for empty prompts and bad options.
        """
        k = num_images_per_prompt
        prompts, expanded, expanded_neg = self.prompt_lists(prompt, negative_prompt, k)
        plan = self.plan(sampler=sampler, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         timestep_spacing=timestep_spacing, eta=eta, seed=seed, generator=generator, batch_size=batch_size,
                         allow_untrained_uncond=allow_untrained_uncond, count=len(prompts) * k)
        ids, neg_ids = self.encode_prompt_pair(expanded, expanded_neg, strict)
        layers = self.model.cross_attention_modules() if attention_maps else []
        announce_total(progress, plan.steps * math.ceil(plan.n / batch_size))
        channels, size = model_input_shape(self.cfg)
        recorder = AttentionMaps(layers) if layers else None
        tensors = self.sample_batches(None, plan.generators, plan.n, (channels, size, size), guide_channels=channels,
                                      batch_size=batch_size, callback=TrajectoryRecorder(()).callback(progress),
                                      conditions=(ids, neg_ids), finish=self.finish_images(),
                                      hooks=[recorder] if recorder is not None else [], **plan.sampling)
        metadata = self.sampling_metadata(plan)
        word_maps = self.word_attention_maps(recorder, expanded, tensors.shape[-1]) if recorder is not None else None
        is_latent = bool(self.cfg.data.latent_channels) and self.vae is None  # undecoded, unclamped latents
        return PromptPipelineOutput([] if is_latent else to_pil(tensors), tensors, None, plan.seeds, metadata, [],
                                    is_latent=is_latent, prompts=expanded, negative_prompts=expanded_neg,
                                    num_images_per_prompt=k, attention_maps=word_maps)

    # ---- ditkit sample ----------------------------------------------------------------------------
    @classmethod
    def add_cli_arguments(cls, parser: Any) -> None:
        cls.add_prompt_arguments(parser)
        parser.add_argument("--num-images-per-prompt", type=int, help="text-to-image: images per prompt (default 4)")
        parser.add_argument("--ddim-eta", type=float, help="samplers that take eta (DDIM)")
        parser.add_argument("--timestep-spacing", choices=["uniform", "quadratic"],
                            help="gaussian samplers (default: the checkpoint's)")
        parser.add_argument("--npz", action="store_true", help="also write samples.npz (arr_0 uint8 NxHxWxC)")

    def cli_call(self, args: Any, distributed: bool = False) -> PromptPipelineOutput:
        prompts = self.cli_prompts(args)
        with sampling_progress() as progress:
            return self(prompts, num_inference_steps=args.num_sampling_steps, guidance_scale=args.cfg_scale,
                        negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images_per_prompt or 4,
                        seed=args.seed, sampler=args.sampler, eta=args.ddim_eta, timestep_spacing=args.timestep_spacing,
                        batch_size=args.batch_size, attention_maps=args.attention_maps, strict=args.strict,
                        allow_untrained_uncond=args.allow_untrained_uncond, progress=progress)

    def cli_save(self, output: PromptPipelineOutput, args: Any, out_dir: Path) -> list[Path]:
        return output.save(out_dir, npz=args.npz)

    def write_training_samples(self, path_stem: Path) -> Path:
        """A grid of ``sample.num_samples`` images for prompts of the training grammar (fixed seeds),
        the prompt under each row; leaves the caller's RNGs as they were."""
        prompts = ["a small red circle", "a large blue square", "a green triangle above a yellow cross",
                   "a white circle to the left of a purple square"]
        k = max(1, self.cfg.sample.num_samples // len(prompts))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            out = self(prompts, num_images_per_prompt=k, allow_untrained_uncond=True)
        path = path_stem.with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(out.grid(), path, {"step": path.stem, "model": self.cfg.model.name})
        return path


class FrozenPromptTokenizer:
    """A frozen encoder's Hugging Face tokenizer with what callers of ``pipe.tokenizer`` use
    (``encode(text, strict)`` with the limit named, as the caption tokenizers have, e.g. the server's
    422 check); everything else is the Hugging Face tokenizer's."""

    def __init__(self, encoder: Any):
        self.hf, self.max_length = encoder.tokenizer, int(encoder.max_length)

    def encode(self, text: str, strict: bool = False) -> list[int]:
        """Token ids, special tokens included; over ``max_length``: ConfigError with ``strict``, else
        truncated with a warning naming the limit."""
        ids = list(self.hf(text)["input_ids"])
        if len(ids) > self.max_length:
            message = f"a prompt of {len(ids)} tokens is longer than the text encoder's limit of {self.max_length} tokens"
            if strict:
                raise ConfigError(f"{message}: shorten it (or drop --strict to truncate)")
            warnings.warn(f"{message}; truncated", stacklevel=2)
            ids = ids[: self.max_length]
        return ids

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hf(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["hf"], name)


def load_frozen_encoder(cfg: Config, path: Optional[str | Path], device: torch.device) -> Any:
    """The frozen encoder a run was trained with (``data.text_encoder``, or ``path`` where it was
    moved), checked against the weights' hash training recorded. ConfigError naming ``--text-encoder``
    when the folder is gone, has no tokenizer, or holds other weights."""
    from ditkit.data.captions import FrozenEncoder, encoder_weights_sha256

    where = str(path or cfg.data.text_encoder)
    if not Path(where).exists():
        raise ConfigError(f"--text-encoder {where}: the frozen text encoder this run was trained with is not there; "
                          "restore the folder or pass --text-encoder NEW_PATH (text_encoder=... in ditkit.load)")
    recorded = cfg.data.text_encoder_sha256
    sha = encoder_weights_sha256(where)
    if recorded and sha != recorded:
        raise ConfigError(f"--text-encoder {where}: its weights differ from the ones this run was trained with "
                          f"(sha256 {sha[:12]}, recorded {recorded[:12]}): pass the original encoder folder")
    return FrozenEncoder(where, max_length=cfg.data.max_caption_length, device=device)
