"""Device and numeric precision: pick them once, use them through ``autocast``.

``precision="auto"`` picks bf16 autocast where the hardware runs bf16 matmuls natively (CUDA with
bf16 support; CPUs with AVX512-BF16 or AMX) and fp32 elsewhere, where bf16 would be emulated and
slower. Weights, optimiser state and the EMA stay fp32 in every case (mixed precision).

Neutral module used by training, sampling and serving (``ditkit.train.precision`` re-exports it).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from ditkit.config import ConfigError

__all__ = ["resolve_device", "resolve_precision", "autocast", "cpu_has_native_bf16"]


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX tiles (bf16 matmuls at full speed)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for probe in probes:
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            pass
    return "AMX" in torch.backends.cpu.get_cpu_capability()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``"fp32"`` -> float32, ``"bf16"`` -> bfloat16, ``"auto"`` -> bf16 where native (see module doc)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("--precision bf16: this GPU has no bf16 support; use --precision fp32")
        return torch.bfloat16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    raise ConfigError(f"--precision {precision}: use auto, fp32 or bf16")


def autocast(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Mixed-precision context for the forward pass (a no-op for float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
