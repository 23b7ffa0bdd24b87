"""Device and numeric precision for training: re-exported from the neutral ``ditkit.device`` (so
sampling and serving use the same resolvers without importing ``ditkit.train``)."""

from __future__ import annotations

from ditkit.device import autocast, cpu_has_native_bf16, resolve_device, resolve_precision

__all__ = ["resolve_device", "resolve_precision", "autocast", "cpu_has_native_bf16"]
