"""Serving text models: a text checkpoint loaded once as a ``TextPipeline`` and called per request
(MDLM ancestral sampling for masked models, next-token sampling for the autoregressive baseline).

A request gives a ``prompt`` (the text continues after it), an infill ``template`` (each
``mask_char`` is one token to fill; masked models only) or neither. The adapter checks it against
the model and the server's limits on the event loop (422 naming the limit), including that the
tokenizer can encode it, so the worker only runs requests that can succeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ditkit.config import ConfigError
from ditkit.pipelines.text import TextPipeline, encode_infill
from ditkit.serve.models import RequestError, ServeLimits, check_range, check_seed, pipeline_labels

__all__ = ["TextModel", "TextJobSpec", "MAX_TEMPERATURE"]

MAX_TEMPERATURE = 10.0


@dataclass
class TextJobSpec:
    """A checked text request (options ready for ``sample_text``)."""

    prompt: Optional[str]
    template: Optional[str]
    mask_char: str
    num_tokens: Optional[int]
    label: Optional[int]
    num_samples: int
    steps: int
    temperature: float
    cfg_scale: float
    seed: int


class TextModel:
    """A text checkpoint served by name."""

    modality = "text"

    def __init__(self, name: str, pipeline: TextPipeline) -> None:
        self.name = name
        self.pipeline = pipeline
        self.cfg = pipeline.cfg
        self.tokenizer = pipeline.tokenizer
        self.class_names = pipeline.class_names
        self.ckpt_dir = pipeline.checkpoint.dir if pipeline.checkpoint is not None else None

    @property
    def num_classes(self) -> int:
        return self.cfg.data.num_classes or 0

    @property
    def masked(self) -> bool:
        return self.cfg.objective.kind == "masked"

    def describe(self, limits: ServeLimits) -> dict[str, Any]:
        cfg, s = self.cfg, self.cfg.sample
        return {
            "name": self.name,
            "modality": "text",
            "architecture": cfg.model.name,
            "objective": cfg.objective.kind,
            "dataset": Path(cfg.data.dataset).name,
            "step": self.pipeline.step,
            "checkpoint_sha256": self.pipeline.checkpoint_sha256,
            "tokenizer": cfg.data.tokenizer,
            "vocab_size": cfg.data.vocab_size,
            "seq_len": cfg.data.seq_len,
            "conditional": self.num_classes > 0,
            "num_classes": self.num_classes,
            "classes": [{"label": i, "name": n} for i, n in enumerate(self.class_names[: self.num_classes])],
            "samplers": [self.pipeline.sampler_name],
            "supports_infill": self.masked,
            "defaults": {
                "length": min(cfg.data.seq_len, limits.max_text_length),
                "steps": min(s.num_sampling_steps, limits.max_steps),
                "temperature": s.temperature,
                "cfg_scale": s.cfg_scale,
                "seed": s.seed,
                "num_samples": 1,
            },
            "limits": {
                "max_prompt_chars": limits.max_prompt_chars,
                # beyond its window a masked model continues in semi-autoregressive windows
                "max_text_length": limits.max_text_length,
                "max_text_samples": limits.max_text_samples,
                "max_steps": limits.max_steps,
                "max_temperature": MAX_TEMPERATURE,
                "min_cfg_scale": limits.min_cfg_scale,
                "max_cfg_scale": limits.max_cfg_scale,
            },
        }

    def check(self, limits: ServeLimits, fields: dict[str, Any]) -> TextJobSpec:
        """Check a ``TextRequest``'s fields; raises ``RequestError`` (422) naming the limit."""
        cfg, s = self.cfg, self.cfg.sample
        prompt, template = fields.get("prompt"), fields.get("template")
        for key, text in (("prompt", prompt), ("template", template)):
            if text is not None and len(text) > limits.max_prompt_chars:
                raise RequestError(
                    422, f"{key} has {len(text)} characters; the limit is {limits.max_prompt_chars} (max_prompt_chars)"
                )
        if prompt and template:
            raise RequestError(422, "give either prompt or template, not both (put the prompt text into the template)")
        if template is not None and fields.get("length") is not None:
            raise RequestError(422, "length is set by the template (one token per mask_char): drop length")
        if template is not None and not self.masked:
            raise RequestError(422, f"model {self.name!r} is autoregressive and writes left to right: template needs a masked model")
        length = fields.get("length")
        if length is not None:
            check_range("length", length, 1, limits.max_text_length, "max_text_length")
        num_samples = fields.get("num_samples", 1)
        check_range("num_samples", num_samples, 1, limits.max_text_samples, "max_text_samples")
        steps = fields.get("steps")
        if steps is not None:
            check_range("steps", steps, 1, limits.max_steps, "max_steps")
        temperature = fields.get("temperature")
        if temperature is not None:
            check_range("temperature", temperature, 0.0, MAX_TEMPERATURE, "max_temperature")
        cfg_scale = fields.get("cfg_scale")
        if cfg_scale is not None:
            check_range("cfg_scale", cfg_scale, limits.min_cfg_scale, limits.max_cfg_scale, "min_cfg_scale..max_cfg_scale")
        seed = fields.get("seed")
        check_seed(seed)
        value = fields.get("class_label")
        label = None if value is None else pipeline_labels(self.pipeline, [value], 1, "class_label")[0]
        mask_char = fields.get("mask_char") or "_"
        prompt_tokens = 0
        try:  # the tokenizer must be able to encode the text (e.g. characters it never saw)
            if template is not None:
                template_ids = encode_infill(self.tokenizer, template, mask_char)
                if len(template_ids) + 1 > cfg.data.seq_len:
                    raise RequestError(
                        422, f"template is {len(template_ids)} tokens; a template must fit the model's window of "
                        f"{cfg.data.seq_len - 1} tokens"
                    )
            elif prompt:
                prompt_tokens = len(self.tokenizer.encode(prompt))
        except (ConfigError, ValueError) as err:
            raise RequestError(422, f"{'template' if template is not None else 'prompt'}: {err}") from None
        steps = min(s.num_sampling_steps, limits.max_steps) if steps is None else steps
        if length is None:  # default: fill the model's window after the prompt
            length = min(max(cfg.data.seq_len - prompt_tokens, 1), limits.max_text_length)
        # sample_text counts the prompt in num_tokens; the API's length counts generated tokens only
        num_tokens = None if template is not None else prompt_tokens + length
        return TextJobSpec(
            prompt=prompt, template=template, mask_char=mask_char, num_tokens=num_tokens, label=label,
            num_samples=num_samples, steps=steps,
            temperature=s.temperature if temperature is None else temperature,
            cfg_scale=s.cfg_scale if cfg_scale is None else cfg_scale,
            seed=s.seed if seed is None else seed,
        )

    def runner(self, spec: TextJobSpec) -> Callable[[Callable[[int], None]], dict[str, Any]]:
        """The job body: sample, decode, and describe (on the worker thread). ``step`` is called
        once per network call (and raises ``JobCancelled`` once the request is cancelled)."""

        def run(step: Callable[[int], None]) -> dict[str, Any]:
            labels = None if spec.label is None else [spec.label] * spec.num_samples
            out = self.pipeline(
                spec.prompt or None, spec.steps, spec.cfg_scale, num_samples=spec.num_samples, class_labels=labels,
                infill=spec.template, mask_char=spec.mask_char, num_tokens=spec.num_tokens,
                temperature=spec.temperature, seed=spec.seed, progress=step,
            )
            meta = dict(out.metadata)
            meta["num_sampling_steps"] = str(spec.steps)  # what was asked (AR: steps are the tokens)
            if spec.label is not None:
                meta["label"] = str(spec.label)
            return {"metadata": meta, "samples": out.records()}

        return run
