"""Audio Diffusion Transformer: a DiT over a log-mel spectrogram read as a 1-D sequence of frames.

The spectrogram (B, n_mels, T) is cut along time into patches of `patch_size` frames; the mel bins
of a patch are its channels, so one token is `n_mels * patch_size` numbers (as Stable Audio and
F5-TTS run a transformer over a 1-D sequence). Conditioning enters only through adaLN-Zero
(Peebles & Xie 2023, sec. 3.2): c = timestep + class label + seconds_start + seconds_total, the last
two as in Stable Audio Open (Evans et al. 2024, sec. 3: timing embeddings summed into the global
conditioning) so a user can ask for a length. The position embedding is the 1-D sin-cos table
computed for the length of each call, so no sequence length is baked into the weights.

The model knows nothing about noise: forward(x, t, y, duration) -> tensor, t on the 0..1000 scale
(docs/architecture.md). Read top to bottom: patch embedding, the model, presets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ditkit.errors import ConfigError
from ditkit.models.dit import count_params, sincos_1d
from ditkit.models.layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    init_adaln_zero,
    run_blocks,
)
from ditkit.registry import MODEL_FAMILIES

__all__ = ["AudioDiT", "AUDIO_DIT_PRESETS", "build_audio_dit", "count_params"]


class FramePatchEmbed(nn.Module):
    """(B, n_mels, T) -> (B, T / p, D) by a Conv1d with kernel = stride = p frames."""

    def __init__(self, patch_size: int, n_mels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv1d(n_mels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).transpose(1, 2)  # (B, D, N) -> (B, N, D)


class AudioDiT(nn.Module):
    """Diffusion Transformer over log-mel frames with adaLN-Zero, class and duration conditioning.

    forward(x, t, y=None, duration=None):
        x: (B, n_mels, T) float, the normalised log-mel spectrogram; T any multiple of patch_size.
        t: (B,) float timestep on the 0..1000 scale.
        y: (B,) int64 class labels in 0..num_classes-1; `num_classes` is the null class used by
           classifier-free guidance. None only for an unconditional model (num_classes = 0).
        duration: seconds, either (B, 2) [seconds_start, seconds_total] or (B,) seconds_total
           (start 0). seconds_total is the length of the audible content inside the window (the
           rest is padding), seconds_start where the window starts in the source file. None means
           start 0 and total = the window, T / frames_per_second. Ignored when the model was built
           with duration_conditioning=False.
    returns (B, out_channels, T), out_channels = 2 * n_mels with `learn_sigma` ([mean, v]), else n_mels.

    Raises ConfigError for an input whose mel bins or length do not fit, or labels missing/extra.
    """

    def __init__(
        self,
        n_mels: int = 64,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
        duration_conditioning: bool = True,
        max_seconds: float = 30.0,
        frames_per_second: float = 64.0,
        qk_norm: bool = False,
        norm: str = "layernorm",
        mlp: str = "gelu",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if hidden_size % 2:
            raise ConfigError(f"audio DiT hidden size {hidden_size} must be even (sin-cos position embedding)")
        if max_seconds <= 0 or frames_per_second <= 0:
            raise ConfigError(f"max_seconds {max_seconds} and frames_per_second {frames_per_second} must be > 0")
        self.n_mels, self.patch_size, self.hidden_size = n_mels, patch_size, hidden_size
        self.out_channels = 2 * n_mels if learn_sigma else n_mels
        self.learn_sigma, self.num_classes = learn_sigma, num_classes
        self.max_seconds, self.frames_per_second = float(max_seconds), float(frames_per_second)
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = FramePatchEmbed(patch_size, n_mels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Seconds are clamped to [0, max_seconds] and mapped to [0, 1000], the range the sinusoid of
        # the timestep embedder is built for, then through their own MLP (SAO: one embedder each).
        self.start_embedder = TimestepEmbedder(hidden_size) if duration_conditioning else None
        self.total_embedder = TimestepEmbedder(hidden_size) if duration_conditioning else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, norm=norm, mlp=mlp) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size * self.out_channels, norm=norm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier Linear/Conv, N(0, 0.02) embeddings; adaLN modulations and the final
        Linear zero (adaLN-Zero), so a fresh model outputs exactly zero and every block is the identity."""
        init_adaln_zero(self)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in (self.t_embedder, self.start_embedder, self.total_embedder):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)

    def pos_embed(self, num_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, N, D) 1-D sin-cos table for token positions 0..N-1 (computed in float64, then cast)."""
        table = sincos_1d(self.hidden_size, torch.arange(num_tokens))
        return table.to(device=device, dtype=dtype).unsqueeze(0)

    def seconds(self, duration: torch.Tensor | None, batch: int, num_frames: int, device: torch.device) -> torch.Tensor:
        """(B, 2) float [seconds_start, seconds_total] from `duration` (see forward)."""
        if duration is None:
            total = torch.full((batch,), num_frames / self.frames_per_second, device=device)
            return torch.stack([torch.zeros_like(total), total], dim=1)
        duration = torch.as_tensor(duration, dtype=torch.float32, device=device)
        if duration.ndim == 1 and duration.shape[0] == batch:
            return torch.stack([torch.zeros_like(duration), duration], dim=1)
        if duration.shape != (batch, 2):
            raise ConfigError(
                f"duration must be (B,) seconds_total or (B, 2) [seconds_start, seconds_total] with B = {batch}, "
                f"got {tuple(duration.shape)}"
            )
        return duration

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        duration: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, n_mels, T = x.shape
        if n_mels != self.n_mels or T % self.patch_size or T == 0:
            raise ConfigError(
                f"audio DiT expects (B, {self.n_mels}, T) with T a positive multiple of patch size "
                f"{self.patch_size}, got {tuple(x.shape)}: pad or cut the spectrogram to whole patches"
            )
        h = self.x_embedder(x)  # (B, N, D), N = T / p
        h = h + self.pos_embed(h.shape[1], h.device, h.dtype)
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            if y is None:
                raise ConfigError("this audio DiT is class-conditional: pass labels y (num_classes is the null class)")
            c = c + self.y_embedder(y)
        elif y is not None:
            raise ConfigError("this audio DiT is unconditional (num_classes=0): pass y=None")
        if self.start_embedder is not None and self.total_embedder is not None:
            secs = self.seconds(duration, B, T, x.device).clamp(0.0, self.max_seconds) * (1000.0 / self.max_seconds)
            c = c + self.start_embedder(secs[:, 0]) + self.total_embedder(secs[:, 1])
        h = run_blocks(self.blocks, h, c, self.grad_checkpointing)
        h = self.final_layer(h, c)  # (B, N, p * out_channels), per-token layout (p, out_channels)
        h = h.reshape(B, T // self.patch_size, self.patch_size, self.out_channels)
        return h.permute(0, 3, 1, 2).reshape(B, self.out_channels, T)


# ------------------------------------------------------------------------------------------------
# Presets. Parameter counts for n_mels=64, patch 2, 10 classes, duration conditioning on (the
# defaults; tests/test_audio_model.py pins them). T: tests; XS: CPU recipe (1 s of 16 kHz audio is
# 64 frames = 32 tokens); S: a small GPU model; B: the GPU size (DiT-B widths, one H100/H200).
# ------------------------------------------------------------------------------------------------

AUDIO_DIT_PRESETS: dict[str, dict[str, Any]] = {
    "AudioDiT-T/2": dict(patch_size=2, depth=4, hidden_size=64, num_heads=4),  # 0.39 M parameters
    "AudioDiT-XS/2": dict(patch_size=2, depth=6, hidden_size=192, num_heads=4),  # 4.38 M
    "AudioDiT-S/2": dict(patch_size=2, depth=12, hidden_size=384, num_heads=6),  # 33.1 M
    "AudioDiT-B/2": dict(patch_size=2, depth=12, hidden_size=768, num_heads=12),  # 131.3 M
}


def build_audio_dit(name: str, **overrides: Any) -> AudioDiT:
    """Build a preset by name ("AudioDiT-XS/2", ...); keyword overrides replace any constructor argument."""
    if name not in AUDIO_DIT_PRESETS:
        raise ConfigError(f"unknown audio model {name!r}; choose one of: {', '.join(AUDIO_DIT_PRESETS)}")
    return AudioDiT(**{**AUDIO_DIT_PRESETS[name], **overrides})


MODEL_FAMILIES.register(
    "audio_dit",
    presets=AUDIO_DIT_PRESETS,
    modality="audio",
    summary="DiT over log-mel frames (1-D patches), class + duration conditioning by adaLN-Zero",
)(AudioDiT)
