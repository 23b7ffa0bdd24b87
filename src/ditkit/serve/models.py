"""What the server serves: checkpoints loaded once, each behind a small adapter that describes the
model (for ``GET /v1/models`` and the page), checks a request against the model and the server's
limits (``RequestError`` -> 4xx, raised on the event loop before anything is queued), and builds
the job its worker runs.

The checks here are the API's own (messages name the request field and the limit); the sampling
code repeats its checks when the job runs, so nothing unchecked reaches a model.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from PIL import Image

from ditkit.builders import default_sampler
from ditkit.config import ConfigError
from ditkit.media import save_png, to_uint8
from ditkit.pipelines.image import ImagePipeline, ImagePipelineOutput
from ditkit.serve.limits import ServeLimits

__all__ = ["ServeLimits", "RequestError", "ImageModel", "ImageJobSpec", "parse_ckpt_arg", "parse_lora_arg", "model_name_for",
           "png_base64", "decode_image"]

MAX_SEED = 2**31 - 1  # seeds are 0..MAX_SEED; sample i uses seed + i, far from int64 overflow
BATCH_SIZE = 64  # images drawn per forward batch


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP code, the message says what to change."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _unprocessable(message: str) -> RequestError:
    return RequestError(422, message)


def check_range(field: str, value: float, low: float, high: float, limit_name: str) -> None:
    """422 naming ``limit_name`` when ``value`` is outside ``[low, high]``."""
    if not low <= value <= high:
        raise _unprocessable(f"{field}={value} is outside the allowed range {low}..{high} ({limit_name})")


def check_seed(seed: Optional[int]) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise _unprocessable(f"seed={seed} is outside the allowed range 0..{MAX_SEED}")


def pipeline_labels(pipeline: Any, class_labels: Optional[Sequence[int | str]], num: int, field: str) -> Optional[list[int]]:
    """``pipeline.resolve_labels`` (the one label check of every pipeline) for a request: its
    ``ConfigError`` becomes a 422 that names the request's ``field`` instead of the CLI flag."""
    try:
        labels, _ = pipeline.resolve_labels(list(class_labels) if class_labels else None, num)
    except ConfigError as err:
        raise _unprocessable(f"{field}: {str(err).replace('--class-labels', field)}") from None
    return labels


def png_base64(pixels: Any, metadata: dict[str, str]) -> str:
    """(H, W, C) uint8 -> base64 of a PNG carrying ``metadata`` as tEXt chunks (as ``ditkit sample``)."""
    buffer = io.BytesIO()
    save_png(pixels, buffer, metadata)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # what ``image`` / ``mask_image`` may be (the page sends PNG)
UPLOAD_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # 8-bit (or 1-bit) gray, palette or colour, alpha ignored
# the pipeline's flag names -> the request's field names, for its ConfigError messages
_FIELD_OF_FLAG = (("--init-image", "image"), ("--mask", "mask_image"), ("--strength", "strength"),
                  (" (drop --strict to resize)", ""))


def decode_image(field_name: str, value: str, size: int) -> Image.Image:
    """An uploaded image: base64 (optionally a ``data:image/...;base64,`` URL) of a PNG, JPEG or WebP
    file of ``size`` x ``size`` pixels, 8-bit gray / palette / RGB(A). Raises ``RequestError``
    (422) naming ``field_name``. The size is checked from the header before the pixels are
    decoded, so a small file that would decompress to a huge image is refused unread."""
    text = value.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise _unprocessable(f"{field_name}: a data: URL must be base64-encoded (data:image/png;base64,...)")
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _unprocessable(f"{field_name}: not valid base64 (send the PNG file's bytes base64-encoded)") from None
    if not raw:
        raise _unprocessable(f"{field_name}: empty; send a PNG (base64), or null for no {field_name}")
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
    except Exception:  # noqa: BLE001 -- Pillow raises several types for data that is not an image
        raise _unprocessable(f"{field_name}: not an image (send a PNG file, base64-encoded)") from None
    if image.format not in UPLOAD_FORMATS:
        raise _unprocessable(f"{field_name}: {image.format} files are not taken; send {', '.join(UPLOAD_FORMATS)}")
    if image.size != (size, size):
        raise _unprocessable(f"{field_name}: the image is {image.width}x{image.height}, the model draws {size}x{size}: "
                             "resize it first (the page does)")
    if image.mode not in UPLOAD_MODES:
        raise _unprocessable(f"{field_name}: mode {image.mode} is not taken; send 8-bit gray, RGB or RGBA")
    try:
        image.load()
    except Exception as err:  # noqa: BLE001 -- truncated or corrupt pixel data
        raise _unprocessable(f"{field_name}: the {image.format} data is corrupt or truncated ({type(err).__name__})") from None
    return image


@dataclass
class ImageJobSpec:
    """A checked image request: everything the worker needs, nothing left to validate."""

    labels: Optional[list[int]]
    num_images: int
    sampler: str
    steps: int
    cfg_scale: float
    seed: int
    lora: Optional[str] = None  # a served LoRA adapter's name; None: the base alone
    prompt: Optional[str] = None  # text-to-image models: what to draw (num_images images of it)
    negative_prompt: Optional[str] = None  # text-to-image: replaces the empty prompt as guidance reference
    image: Optional[Image.Image] = None  # uploaded init image, the model's size and mode (L or RGB)
    mask_image: Optional[Image.Image] = None  # uploaded mask, mode L: white = regenerate
    strength: Optional[float] = None  # image-to-image (SDEdit) strength in (0, 1]


class ImageModel:
    """An image checkpoint served by name."""

    modality = "image"

    def __init__(self, name: str, pipeline: ImagePipeline) -> None:
        cfg = pipeline.cfg
        self.ckpt_dir = pipeline.checkpoint.dir if pipeline.checkpoint is not None else None
        if cfg.data.latent_channels and pipeline.vae is None:
            raise ConfigError(
                f"--ckpt {self.ckpt_dir} is a latent model and its VAE is not available: "
                "serve it where its VAE folder exists (data.vae in its config)"
            )
        self.name = name
        self.pipeline = pipeline
        self.cfg = cfg
        self.loras: dict[str, float] = {}  # served adapters (--lora NAME=PATH[:WEIGHT]) -> weight when picked

    def add_lora(self, name: str, path: str, weight: float = 1.0) -> None:
        """Load an adapter once, switched off (weight 0) until a request picks it by ``name``.
        Raises ``ConfigError`` when it was trained on another base (``Pipeline.load_lora``)."""
        self.pipeline.load_lora(path, scale=0.0, name=name)
        self.loras[name] = weight

    def _select_lora(self, chosen: Optional[str]) -> None:
        """The picked adapter at its weight, the other served ones off (on the worker thread)."""
        if self.loras:
            from ditkit.adapters import set_adapter_scales

            set_adapter_scales(self.pipeline.model, {n: (w if n == chosen else 0.0) for n, w in self.loras.items()})

    @property
    def samplers(self) -> tuple[str, ...]:
        return tuple(self.pipeline.sampler_names)

    def describe(self, limits: ServeLimits) -> dict[str, Any]:
        """The public facts of the model (no file paths): for ``GET /v1/models`` and the page."""
        cfg, gen = self.cfg, self.pipeline
        max_steps = limits.max_steps
        if getattr(self.pipeline.objective, "family", None) == "gaussian":  # gaussian and its distilled students
            max_steps = min(max_steps, cfg.objective.num_timesteps)
        return {
            "name": self.name,
            "modality": "image",
            "architecture": cfg.model.name,
            "objective": cfg.objective.kind,
            "dataset": Path(cfg.data.dataset).name,
            "step": gen.step,
            "checkpoint_sha256": gen.checkpoint_sha256,
            "image_size": cfg.data.image_size,
            "channels": cfg.data.channels,
            "conditional": gen.num_classes > 0,
            "num_classes": gen.num_classes,
            "classes": [{"label": i, "name": n} for i, n in enumerate(gen.class_names[: gen.num_classes])],
            "samplers": list(self.samplers),
            "loras": [{"name": n, "weight": w} for n, w in self.loras.items()],
            "prompts": self.takes_prompts,  # text-to-image: send prompt (and negative_prompt), not class_labels
            "max_prompt_tokens": self.pipeline.max_prompt_tokens if self.takes_prompts else None,
            "takes_image": self.takes_image,  # image / mask_image / strength (img2img, inpainting)
            "defaults": {
                "sampler": default_sampler(cfg),
                "steps": min(cfg.sample.num_sampling_steps, max_steps),
                "cfg_scale": min(max(cfg.sample.cfg_scale, limits.min_cfg_scale), limits.max_cfg_scale),
                "seed": cfg.sample.seed,
                "num_images": min(4, limits.max_images_per_request),
            },
            "limits": {
                "max_images_per_request": limits.max_images_per_request,
                "max_steps": max_steps,
                "min_cfg_scale": limits.min_cfg_scale,
                "max_cfg_scale": limits.max_cfg_scale,
                "max_seed": MAX_SEED,
            },
        }

    def resolve_labels(self, class_labels: Optional[Sequence[int | str]], num_images: int) -> Optional[list[int]]:
        """Per-image labels (``Pipeline.resolve_labels``: ints or class names repeated to
        ``num_images``; default: the classes in turn; None for an unconditional model), its
        ``ConfigError`` as a 422 naming the field."""
        return pipeline_labels(self.pipeline, class_labels, num_images, "class_labels")

    def check(
        self,
        limits: ServeLimits,
        *,
        class_labels: Optional[Sequence[int | str]],
        num_images: int,
        sampler: Optional[str],
        steps: Optional[int],
        cfg_scale: Optional[float],
        seed: Optional[int],
        lora: Optional[str] = None,
        prompt: Optional[str] = None,
        negative_prompt: Optional[str] = None,
        image: Optional[str] = None,
        mask_image: Optional[str] = None,
        strength: Optional[float] = None,
    ) -> ImageJobSpec:
        """Check a request against the model and ``limits``; raises ``RequestError`` (422).
        ``image`` / ``mask_image``: base64 PNGs (``decode_image``), ``strength`` in (0, 1]."""
        cfg = self.cfg
        control = self._check_control(image, mask_image, strength)
        if self.takes_prompts:
            self._check_prompts(prompt, negative_prompt, class_labels)
        elif prompt is not None or negative_prompt is not None:
            raise _unprocessable(f"model {self.name!r} draws class labels, not prompts: drop prompt / negative_prompt")
        if lora is not None and lora not in self.loras:
            served = ", ".join(self.loras) or "none (ditkit serve --lora NAME=PATH adds them)"
            raise _unprocessable(f"lora={lora!r} is not an adapter of model {self.name!r}: use one of {served}, or null")
        check_range("num_images", num_images, 1, limits.max_images_per_request, "max_images_per_request")
        if class_labels is not None and len(class_labels) > limits.max_images_per_request:
            raise _unprocessable(
                f"class_labels has {len(class_labels)} entries; the limit is {limits.max_images_per_request} "
                "(max_images_per_request)"
            )
        if sampler is not None and sampler != "auto" and sampler not in self.samplers:
            raise _unprocessable(
                f"sampler={sampler!r} does not fit model {self.name!r} ({cfg.objective.kind}): "
                f"use one of {', '.join(self.samplers)}"
            )
        if steps is not None:
            check_range("steps", steps, 1, limits.max_steps, "max_steps")
        if cfg_scale is not None:
            check_range("cfg_scale", cfg_scale, limits.min_cfg_scale, limits.max_cfg_scale, "min_cfg_scale..max_cfg_scale")
        check_seed(seed)
        labels = self.resolve_labels(class_labels, num_images)
        try:
            sampler, steps, cfg_scale, _ = self.pipeline.check_options(sampler, steps, cfg_scale)
            if self.takes_prompts:
                self.pipeline.check_prompt_guidance(cfg_scale, allow_untrained_uncond=False)
            else:
                self.pipeline.check_guidance(cfg_scale if labels is not None else 1.0)
        except ConfigError as err:  # e.g. more steps than the model's training schedule has
            raise _unprocessable(str(err).replace("--num-sampling-steps", "steps").replace("--cfg-scale", "cfg_scale")) from None
        # a default taken from the checkpoint may exceed the server's limit: say so, never lower it silently
        check_range("steps (the model's default sample.num_sampling_steps; send a smaller steps)", steps, 1,
                    limits.max_steps, "max_steps")
        seed = cfg.sample.seed if seed is None else seed
        return ImageJobSpec(labels, num_images, sampler, steps, float(cfg_scale), seed, lora, prompt, negative_prompt,
                            *control)

    @property
    def takes_image(self) -> bool:
        """Whether requests may send ``image`` (class-conditional / unconditional image pipelines)."""
        return self.modality == "image" and not self.takes_prompts

    def _check_control(
        self, image: Optional[str], mask_image: Optional[str], strength: Optional[float]
    ) -> tuple[Optional[Image.Image], Optional[Image.Image], Optional[float]]:
        """Decoded ``(image in the model's mode, mask in mode L, strength)``; 422 naming the field."""
        if image is None:
            if mask_image is not None or strength is not None:
                what = "mask_image" if mask_image is not None else "strength"
                raise _unprocessable(f"{what} edits an uploaded picture: send image too (base64 PNG)")
            return None, None, None
        if not self.takes_image:
            raise _unprocessable(f"image: model {self.name!r} does not take an image "
                                 f"({self.pipeline.modality.replace('_', '-')} model); drop image")
        if strength is not None and not 0 < strength <= 1:
            raise _unprocessable(f"strength={strength} is outside (0, 1]: 1 = plain sampling, small values keep the image")
        size = self.cfg.data.image_size
        picture = decode_image("image", image, size).convert("L" if (self.cfg.data.channels or 3) == 1 else "RGB")
        mask = decode_image("mask_image", mask_image, size).convert("L") if mask_image is not None else None
        if mask is not None:  # the pipeline's own checks (prepare_mask), here worded with the field
            extremes = mask.point(lambda v: 255 if v >= 128 else 0).getextrema()  # thresholded at 0.5, as it is
            if extremes == (0, 0):
                raise _unprocessable("mask_image is all black (keep everything): paint white where to regenerate")
            if extremes == (255, 255):
                raise _unprocessable("mask_image is all white (nothing kept): send image without mask_image instead")
        return picture, mask, strength

    @staticmethod
    def _field_names(err: ConfigError) -> ConfigError:
        """The pipeline's ``ConfigError`` with its flags renamed to the request's fields (a 422)."""
        message = str(err)
        for flag, field_name in _FIELD_OF_FLAG:
            message = message.replace(flag, field_name)
        return ConfigError(message)

    @property
    def takes_prompts(self) -> bool:
        """Whether the served model takes prompts (text-to-image or text-to-video: its pipeline encodes them)."""
        return hasattr(self.pipeline, "encode_prompts")

    def _check_prompts(self, prompt: Optional[str], negative_prompt: Optional[str], class_labels: Any) -> None:
        """422 for class labels, a missing or empty prompt, or a prompt over the token limit (named)."""
        kind = self.pipeline.modality.replace("_", "-")  # text-to-image, text-to-video
        if class_labels:
            raise _unprocessable(f"model {self.name!r} is {kind}: send prompt, not class_labels")
        if prompt is None or not prompt.strip():
            raise _unprocessable(f"model {self.name!r} is {kind}: send a non-empty prompt")
        limit = self.pipeline.max_prompt_tokens
        for field_name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            try:
                if text is not None:
                    self.pipeline.tokenizer.encode(text, strict=True)
            except ConfigError:  # over the limit (DataError)
                raise _unprocessable(f"{field_name} is longer than model {self.name!r}'s limit of {limit} tokens "
                                     "(max_prompt_tokens): shorten it") from None

    def runner(self, spec: ImageJobSpec) -> Callable[[Callable[[int], None]], dict[str, Any]]:
        """The job body: sample and encode the PNGs (all on the worker thread)."""

        def run(step: Callable[[int], None]) -> dict[str, Any]:
            self._select_lora(spec.lora)  # one worker per model: no other job sees these weights
            if spec.prompt is not None:  # text-to-image
                return self.encode(self.pipeline(
                    spec.prompt, negative_prompt=spec.negative_prompt, num_images_per_prompt=spec.num_images,
                    sampler=spec.sampler, num_inference_steps=spec.steps, guidance_scale=spec.cfg_scale, seed=spec.seed,
                    batch_size=BATCH_SIZE, progress=step,
                ))
            control: dict[str, Any] = {}
            if spec.image is not None:  # one upload serves every image; exact size, no silent resize
                control = {"image": spec.image, "mask_image": spec.mask_image, "strength": spec.strength, "strict": True}
            try:
                result = self.pipeline(
                    class_labels=spec.labels, num_samples=spec.num_images, sampler=spec.sampler,
                    num_inference_steps=spec.steps, guidance_scale=spec.cfg_scale, seed=spec.seed, batch_size=BATCH_SIZE,
                    progress=step, **control,
                )
            except ConfigError as err:  # -> 422 (ServeState.run), worded with the request's fields
                raise self._field_names(err) from None
            return self.encode(result)

        return run

    def encode(self, result: ImagePipelineOutput) -> dict[str, Any]:
        """``{"metadata": shared entries, "images": [{index, seed, label, class_name, png_base64, metadata}]}``."""
        pixels = to_uint8(result.tensors)  # (N, H, W, C)
        images = []
        for i in range(len(pixels)):
            meta = result.sample_metadata(i)
            images.append({
                "index": i,
                "seed": None if result.seeds is None else result.seeds[i],
                "label": None if result.labels is None else result.labels[i],
                "class_name": meta.get("class_name"),
                "width": int(pixels.shape[2]),
                "height": int(pixels.shape[1]),
                "png_base64": png_base64(pixels[i], meta),
                "metadata": meta,
            })
        return {"metadata": dict(result.metadata), "images": images}


def parse_ckpt_arg(arg: str) -> tuple[Optional[str], str]:
    """``"NAME=PATH"`` -> ``(NAME, PATH)``; ``"PATH"`` -> ``(None, PATH)``."""
    if "=" in arg and not Path(arg).exists():
        name, path = arg.split("=", 1)
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"--ckpt {arg}: a model name may use letters, digits, '-', '_' and '.' only (NAME=PATH)")
        return name, path
    return None, arg


def parse_lora_arg(arg: str) -> tuple[str, str, float]:
    """``--lora NAME=PATH[:WEIGHT]`` -> ``(NAME, PATH, WEIGHT)`` (weight 1 by default)."""
    from ditkit.adapters import parse_adapter_spec

    name, sep, rest = arg.partition("=")
    if not sep or not name or not rest:
        raise ConfigError(f"--lora {arg}: write NAME=PATH[:WEIGHT], e.g. --lora style=runs/style_lora:0.8")
    path, weight = parse_adapter_spec(rest)
    return name, path, weight


def model_name_for(ckpt_dir: Path) -> str:
    """Default public name of a checkpoint: its run directory's name (``000-DiT-T-4-shapes``), else
    the checkpoint directory's name."""
    run = ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else ckpt_dir
    return run.name or ckpt_dir.name
