"""``ditkit serve``: an HTTP API and a web page over checkpoints the operator chose at start-up.

Endpoints (the OpenAPI schema is at ``/openapi.json``, browsable at ``/docs``):

* ``GET /``                   the page (plain HTML + JS from ``static/``, no build step)
* ``GET /health``             liveness and queue depths; answers even when every model is busy
* ``GET /v1/models``          served models: modality, classes, image size, defaults, limits
* ``POST /v1/images``         generate images -> PNGs (base64) carrying ``ditkit sample``'s metadata;
                              with ``image`` (+ ``mask_image``, ``strength``): image-to-image / inpainting
* ``POST /v1/text``           generate text with a text model (prompt, or an infill template)
* ``POST /v1/audio``          generate sounds with an audio model -> WAVs and spectrogram PNGs (base64)
* ``POST /v1/videos``         generate clips with a video model -> looping GIFs and contact-sheet PNGs (base64)
* ``GET /v1/progress/{id}``   progress of a request sent with ``request_id`` (polled by the page)

Load and bad input: each model has one worker thread and a bounded queue (``workers.py``); a full
queue answers 503 with ``Retry-After`` at once; a request over a limit answers 422 naming the
limit; a body over ``max_body_bytes`` answers 413; a request that runs past ``request_timeout_s``
answers 504 and its job is stopped at its next sampler step. A failing job answers 500 and the
worker carries on with the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

import ditkit
from ditkit.config import ConfigError
from ditkit.safety import Blocklist, Refused
from ditkit.serve.audio import AudioModel
from ditkit.serve.video import VideoModel
from ditkit.serve.models import ImageModel, RequestError, ServeLimits
from ditkit.serve.text import TextModel
from ditkit.serve.workers import Job, JobCancelled, ModelWorker, ProgressBoard, QueueFullError

__all__ = ["create_app", "ServeState", "ImageRequest", "TextRequest"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# The page loads only its own script and style and shows images from data: URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; media-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


# ---- request bodies (types only; ranges are the server's limits, checked in ditkit.serve.models) ----


class ImageRequest(BaseModel):
    """``POST /v1/images``. Unset options take the checkpoint's ``sample`` defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(max_length=200, description="a name from GET /v1/models")
    class_labels: Optional[list[Union[int, str]]] = Field(
        None, description="labels (0..num_classes-1) or class names, repeated to num_images; "
        "null: the classes in turn; must be null or [] for an unconditional model"
    )
    num_images: int = Field(1, description="images to draw (at most limits.max_images_per_request)")
    sampler: Optional[str] = Field(None, max_length=32, description="one of the model's samplers; null: its default")
    steps: Optional[int] = Field(None, description="sampling steps (at most limits.max_steps)")
    cfg_scale: Optional[float] = Field(None, allow_inf_nan=False, description="classifier-free guidance scale; 1 = none")
    seed: Optional[int] = Field(None, description="image i uses seed + i (0..2**31-1)")
    lora: Optional[str] = Field(None, max_length=100, description="a LoRA adapter of the model (its loras in "
                                "GET /v1/models); null: the base alone")
    prompt: Optional[str] = Field(None, max_length=2000, description="text-to-image models (prompts true in "
                                  "GET /v1/models): what to draw; at most max_prompt_tokens tokens")
    negative_prompt: Optional[str] = Field(None, max_length=2000, description="text-to-image: what to steer away "
                                           "from (replaces the empty prompt of guidance)")
    image: Optional[str] = Field(None, description="image-to-image / inpainting (takes_image in GET /v1/models): a "
                                 "PNG of the model's image_size, base64 or a data:image/png;base64 URL; one picture "
                                 "for every image drawn; the whole body is at most limits.max_body_bytes")
    mask_image: Optional[str] = Field(None, description="with image: inpainting mask (same size, base64 PNG); white = "
                                      "regenerate, black = keep the uploaded pixels")
    strength: Optional[float] = Field(None, allow_inf_nan=False, description="with image: image-to-image strength "
                                      "in (0, 1] (null: 0.8 without a mask, full sampling with one; 1 = plain sampling)")
    request_id: Optional[str] = Field(
        None, pattern=REQUEST_ID_PATTERN, description="client-chosen id to poll GET /v1/progress/{request_id}"
    )


class TextRequest(BaseModel):
    """``POST /v1/text``. Give a ``prompt`` (text continues after it) or an infill ``template``
    (each ``mask_char`` is one token to fill), or neither for unconditional text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(max_length=200, description="a name from GET /v1/models (modality text)")
    prompt: Optional[str] = Field(None, description="text to continue (at most limits.max_prompt_chars characters)")
    template: Optional[str] = Field(None, description="infill template, e.g. '12+__=__' (a masked model only)")
    mask_char: str = Field("_", min_length=1, max_length=1, description="the character marking a position to fill")
    length: Optional[int] = Field(None, description="tokens to generate after the prompt (at most limits.max_text_length)")
    class_label: Optional[Union[int, str]] = Field(None, description="label or class name of a conditional model")
    num_samples: int = Field(1, description="samples to draw (at most limits.max_text_samples)")
    steps: Optional[int] = Field(None, description="denoising steps (masked models; at most limits.max_steps)")
    temperature: Optional[float] = Field(None, allow_inf_nan=False, description="0 = greedy")
    cfg_scale: Optional[float] = Field(None, allow_inf_nan=False, description="guidance scale with a class_label")
    seed: Optional[int] = Field(None, description="sample i uses seed + i (0..2**31-1)")
    request_id: Optional[str] = Field(None, pattern=REQUEST_ID_PATTERN)


class GeneratedImage(BaseModel):
    index: int
    seed: int
    label: Optional[int]
    class_name: Optional[str]
    width: int
    height: int
    png_base64: str = Field(description="the PNG file, base64; its tEXt chunks hold `metadata`")
    metadata: dict[str, str]


class ImageResponse(BaseModel):
    model: str
    elapsed_s: float
    metadata: dict[str, str] = Field(description="what `ditkit sample` writes into its PNGs")
    images: list[GeneratedImage]


class GeneratedText(BaseModel):
    index: int
    seed: int
    label: Optional[int] = None
    class_name: Optional[str] = None
    text: str


class TextResponse(BaseModel):
    model: str
    elapsed_s: float
    metadata: dict[str, str]
    samples: list[GeneratedText]


class ClipRequest(BaseModel):
    """What ``POST /v1/audio`` and ``POST /v1/videos`` share. Unset options take the checkpoint's
    ``sample`` defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(max_length=200, description="a name from GET /v1/models (of the endpoint's modality)")
    class_labels: Optional[list[Union[int, str]]] = Field(
        None, description="labels or class names, repeated to num_samples; null: the classes in turn"
    )
    num_samples: int = Field(1, description="clips to draw (at most limits.max_images_per_request)")
    sampler: Optional[str] = Field(None, max_length=32)
    steps: Optional[int] = Field(None, description="sampling steps (at most limits.max_steps)")
    cfg_scale: Optional[float] = Field(None, allow_inf_nan=False, description="classifier-free guidance scale; 1 = none")
    seed: Optional[int] = Field(None, description="clip i uses seed + i (0..2**31-1)")
    request_id: Optional[str] = Field(None, pattern=REQUEST_ID_PATTERN)


class AudioRequest(ClipRequest):
    """``POST /v1/audio``."""

    duration: Optional[float] = Field(None, allow_inf_nan=False, description="seconds per clip; null: the trained length")


class VideoRequest(ClipRequest):
    """``POST /v1/videos``."""

    num_frames: Optional[int] = Field(None, description="frames per clip (at most limits.max_frames); null: the trained length")
    fps: Optional[float] = Field(None, allow_inf_nan=False, description="playback rate of the GIFs (default 8)")
    prompt: Optional[str] = Field(None, max_length=2000, description="text-to-video models (prompts true in "
                                  "GET /v1/models): what to draw; num_samples clips of it")
    negative_prompt: Optional[str] = Field(None, max_length=2000, description="text-to-video: what to steer away "
                                           "from (replaces the empty prompt of guidance)")


class GeneratedClipBase(BaseModel):
    index: int
    seed: int
    label: Optional[int]
    class_name: Optional[str]
    metadata: dict[str, str]


class GeneratedClip(GeneratedClipBase):
    sample_rate: int
    seconds: float
    wav_base64: str = Field(description="the WAV file (16-bit PCM, mono), base64")
    spectrogram_png_base64: str = Field(description="its log-mel spectrogram as a PNG carrying `metadata`")


class GeneratedVideo(GeneratedClipBase):
    num_frames: int
    fps: float
    gif_base64: str = Field(description="the clip as a looping GIF, base64")
    contact_sheet_png_base64: str = Field(description="its frames in a row as a PNG carrying `metadata`")


class AudioResponse(BaseModel):
    model: str
    elapsed_s: float
    metadata: dict[str, str]
    clips: list[GeneratedClip]


class VideoResponse(BaseModel):
    model: str
    elapsed_s: float
    metadata: dict[str, str]
    clips: list[GeneratedVideo]


# ---- state ---------------------------------------------------------------------------------------

# The error answers every generating endpoint documents in the OpenAPI schema.
GENERATE_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown model"}, 422: {"description": "invalid or over a limit"},
    503: {"description": "queue full (Retry-After)"}, 504: {"description": "timed out"},
}


ServedModel = Union[ImageModel, TextModel, AudioModel, VideoModel]
ENDPOINTS = {"image": "/v1/images", "text": "/v1/text", "audio": "/v1/audio", "video": "/v1/videos"}  # where each modality is asked


class ServeState:
    """The served models, one worker each, the limits and the progress board."""

    def __init__(self, models: Sequence[ServedModel], limits: ServeLimits) -> None:
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"two checkpoints are served as {duplicates[0]!r}: name them with --ckpt NAME=PATH")
        if not models:
            raise ConfigError("nothing to serve: pass --ckpt RUN_OR_CKPT (one or more)")
        self.limits = limits
        self.models = {m.name: m for m in models}
        self.workers = {m.name: ModelWorker(m.name, limits.max_queue) for m in models}
        self.progress = ProgressBoard()
        self.started_at = time.time()
        self.blocklist = Blocklist()  # create_app sets the operator's list

    def get(self, name: str, modality: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise RequestError(404, f"model {name!r} is not served here; available: {', '.join(self.models)} (GET /v1/models)")
        if model.modality != modality:
            other = ENDPOINTS.get(model.modality, "/v1/images")
            raise RequestError(422, f"model {name!r} is {'an' if model.modality == 'image' else 'a'} {model.modality} model: send this request to POST {other}")
        return model

    async def run(self, model: ServedModel, job: Job) -> Any:
        """Queue ``job`` on the model's worker and wait for it, at most ``request_timeout_s``."""
        worker = self.workers[model.name]
        worker.submit(job)  # QueueFullError -> 503 (handler below)
        self.progress.add(worker, job)
        timeout = self.limits.request_timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), timeout)
        except asyncio.TimeoutError:
            worker.cancel(job)
            raise RequestError(
                504, f"the request took longer than the server's timeout of {timeout:g} s (request_timeout_s); "
                "ask for fewer images or steps, or retry when the queue is shorter"
            ) from None
        except asyncio.CancelledError:  # the client went away: stop the work too
            worker.cancel(job)
            raise
        except JobCancelled as err:
            raise RequestError(503, f"the request was cancelled: {err}") from None
        except (ConfigError, ValueError) as err:
            raise RequestError(422, str(err)) from None
        except Exception as err:  # noqa: BLE001 -- reported to the client; the worker goes on
            raise RequestError(500, f"generation failed on model {model.name!r}: {type(err).__name__}: {err}") from None

    def screen(self, text: Optional[str], what: str) -> None:
        """422 naming the blocklist rule that ``text`` matches (never the matched text)."""
        if text:
            try:
                self.blocklist.enforce(text, what)
            except Refused as err:
                raise RequestError(422, str(err)) from None

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()


# ---- errors --------------------------------------------------------------------------------------


def _describe_validation_error(error: dict[str, Any]) -> tuple[str, str]:
    """``(field, readable message)`` of a pydantic error, e.g. ``("steps", "steps: Input should be
    a valid integer (got 'ten')")``."""
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    where = ".".join(loc) or "body"
    if error.get("type") == "json_invalid":
        return where, f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    if error.get("type") == "missing":
        return where, f"{where}: required field is missing" if loc else "a JSON request body is required"
    if error.get("type") == "extra_forbidden":
        return where, f"{where}: unknown field (see the request schema at /docs)"
    message = f"{where}: {error.get('msg', 'invalid value')}"
    if "input" in error and error.get("type") != "model_attributes_type":
        shown = repr(error["input"])
        message += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    return where, message


def _error(status: int, message: str, headers: Optional[dict[str, str]] = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": message, **extra}, status_code=status, headers=headers)


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes`` (by Content-Length at once, or
    while reading a body sent without one), before any parsing."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = _error(413, f"the request body exceeds the limit of {self.max_bytes} bytes (max_body_bytes)")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_big(scope, receive, send)
        # Read the whole (bounded) body first, then replay it to the app.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---- the app -------------------------------------------------------------------------------------


def create_app(
    models: Sequence[ServedModel], limits: Optional[ServeLimits] = None, blocklist: Optional[Blocklist] = None
) -> FastAPI:
    """The FastAPI app serving ``models`` (already loaded) under ``limits``. Starts one worker
    thread per model; ``app.state.ditkit.close()`` (run at shutdown) stops them. ``blocklist``
    (``ditkit.safety``; default: an empty list, i.e. the filter is on and blocks nothing until the
    operator's file gives rules) screens prompts and generated text: a match answers 422 naming
    the rule, never the matched text."""
    limits = limits or ServeLimits()
    state = ServeState(models, limits)
    state.blocklist = blocklist if blocklist is not None else Blocklist()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()  # at shutdown: cancel waiting jobs, stop the workers

    app = FastAPI(
        title="ditkit serve",
        version=ditkit.__version__,
        description="Generate images (and text) from Diffusion Transformer checkpoints chosen by the operator.",
        lifespan=lifespan,
    )
    app.state.ditkit = state
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        return _error(err.status, err.message)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, err: QueueFullError) -> JSONResponse:
        return _error(503, str(err), headers={"Retry-After": str(err.retry_after_s)}, retry_after_s=err.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        described = [_describe_validation_error(e) for e in err.errors()]
        return _error(422, "; ".join(m for _, m in described) or "invalid request",
                      errors=[{"field": f, "message": m} for f, m in described])

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    @app.get("/health", summary="Liveness and queue depths")
    async def health() -> JSONResponse:
        stats = {name: w.stats() for name, w in state.workers.items()}
        ok = all(s["worker_alive"] for s in stats.values())
        body = {"status": "ok" if ok else "degraded", "version": ditkit.__version__,
                "uptime_s": round(time.time() - state.started_at, 1), "models": stats}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models", summary="Served models, their defaults and the request limits")
    async def list_models() -> dict[str, Any]:
        data = []
        for name, model in state.models.items():
            entry = model.describe(limits)
            entry["queue"] = state.workers[name].stats()
            data.append(entry)
        return {"models": data, "limits": limits.to_dict()}

    async def answer(model: ServedModel, spec: Any, request_id: Optional[str], started: float) -> dict[str, Any]:
        """Queue ``model``'s job for a checked request and wait for it: the reply every endpoint sends."""
        result = await state.run(model, Job(model.runner(spec), request_id=request_id))
        return {"model": model.name, "elapsed_s": round(time.monotonic() - started, 3), **result}

    @app.post("/v1/images", response_model=ImageResponse, summary="Generate images",
              responses={**GENERATE_ERRORS, 413: {"description": "body too large"}})
    async def images(body: ImageRequest) -> dict[str, Any]:
        started = time.monotonic()
        model = state.get(body.model, "image")
        assert isinstance(model, ImageModel)
        state.screen(body.prompt, "prompt")
        state.screen(body.negative_prompt, "negative prompt")
        spec = model.check(limits, class_labels=body.class_labels, num_images=body.num_images, sampler=body.sampler,
                           steps=body.steps, cfg_scale=body.cfg_scale, seed=body.seed, lora=body.lora,
                           prompt=body.prompt, negative_prompt=body.negative_prompt, image=body.image,
                           mask_image=body.mask_image, strength=body.strength)
        return await answer(model, spec, body.request_id, started)

    @app.post("/v1/text", response_model=TextResponse, summary="Generate text (text models)",
              responses=GENERATE_ERRORS)
    async def text(body: TextRequest) -> dict[str, Any]:
        started = time.monotonic()
        model = state.get(body.model, "text")
        assert isinstance(model, TextModel)
        state.screen(body.prompt, "prompt")
        state.screen(body.template, "template")
        spec = model.check(limits, body.model_dump(exclude={"model", "request_id"}))
        reply = await answer(model, spec, body.request_id, started)
        for sample in reply.get("samples", []):  # generated text is screened too
            state.screen(sample.get("text"), "generated text")
        return reply

    @app.post("/v1/audio", response_model=AudioResponse, summary="Generate sounds (audio models)",
              responses=GENERATE_ERRORS)
    async def audio(body: AudioRequest) -> dict[str, Any]:
        started = time.monotonic()
        model = state.get(body.model, "audio")
        assert isinstance(model, AudioModel)
        spec = model.check_audio(limits, class_labels=body.class_labels, num_samples=body.num_samples,
                                 duration=body.duration, sampler=body.sampler, steps=body.steps,
                                 cfg_scale=body.cfg_scale, seed=body.seed)
        return await answer(model, spec, body.request_id, started)

    @app.post("/v1/videos", response_model=VideoResponse, summary="Generate clips (video models)",
              responses=GENERATE_ERRORS)
    async def videos(body: VideoRequest) -> dict[str, Any]:
        started = time.monotonic()
        model = state.get(body.model, "video")
        assert isinstance(model, VideoModel)
        state.screen(body.prompt, "prompt")
        state.screen(body.negative_prompt, "negative prompt")
        spec = model.check_video(limits, class_labels=body.class_labels, num_samples=body.num_samples,
                                 num_frames=body.num_frames, fps=body.fps, sampler=body.sampler, steps=body.steps,
                                 cfg_scale=body.cfg_scale, seed=body.seed, prompt=body.prompt,
                                 negative_prompt=body.negative_prompt)
        return await answer(model, spec, body.request_id, started)

    @app.get("/v1/progress/{request_id}", summary="Progress of a request sent with request_id")
    async def progress(request_id: str) -> dict[str, Any]:
        entry = state.progress.get(request_id)
        if entry is None:
            raise RequestError(404, f"no request with request_id {request_id!r} (recent requests only)")
        return entry

    return app
