"""What one request may ask for: the limits the operator sets with ``ditkit serve`` flags. A
request over a limit answers 422 with a message naming it. (A module of its own so that building
the ``ditkit`` argument parser does not import FastAPI or the models.)"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ditkit.config import ConfigError

__all__ = ["ServeLimits"]

# limit -> the ``ditkit serve`` flag that sets it (integer limits, each at least 1)
FLAGS = {
    "max_images_per_request": "--max-images",
    "max_steps": "--max-steps",
    "max_prompt_chars": "--max-prompt-chars",
    "max_text_length": "--max-text-length",
    "max_text_samples": "--max-text-samples",
    "max_queue": "--max-queue",
    "max_body_bytes": "--max-body-bytes",
}


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for (the operator sets these with ``ditkit serve`` flags)."""

    max_images_per_request: int = 16
    max_steps: int = 250
    min_cfg_scale: float = 0.0
    max_cfg_scale: float = 20.0
    max_prompt_chars: int = 2000
    max_text_length: int = 1024  # tokens generated per text sample (also capped by the model's length)
    max_text_samples: int = 8
    max_queue: int = 8  # waiting requests per model; one more runs
    request_timeout_s: float = 120.0
    max_body_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name, flag in FLAGS.items():
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag} {getattr(self, name)}: must be at least 1")
        if not 0 <= self.min_cfg_scale <= self.max_cfg_scale:
            raise ConfigError(f"--max-cfg-scale {self.max_cfg_scale}: must be at least the minimum {self.min_cfg_scale}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"--request-timeout {self.request_timeout_s}: must be positive (seconds)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
