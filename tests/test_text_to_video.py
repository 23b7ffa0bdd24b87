"""Text-to-video: Latte with cross-attention to a prompt (``T2V-Latte-*``), trained on the captioned
``moving_digits`` clips and sampled / scored / served from prompts through the same pipeline road
as text-to-image and class-conditional video."""

import json

import pytest
import torch

pytest.importorskip("mlxtend")
pytest.importorskip("imageio.v3")
pytest.importorskip("imageio_ffmpeg")

import ditkit  # noqa: E402
from ditkit.builders import build_model, model_kwargs  # noqa: E402
from ditkit.cli import main  # noqa: E402
from ditkit.config import (  # noqa: E402
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
)
from ditkit.data import DataError, load_dataset  # noqa: E402
from ditkit.models.latte import Latte  # noqa: E402
from ditkit.models.prompt_dit import PROMPT_LATTE_PRESETS, PromptDiT  # noqa: E402
from ditkit.models.text_encoder import PromptCondition  # noqa: E402
from ditkit.pipelines.text_to_video import TextToVideoPipeline  # noqa: E402
from ditkit.recipes import get_recipe  # noqa: E402

quiet = lambda m: None  # noqa: E731


def tiny_cfg(tmp_path, name, **train):
    """A seconds-long text-to-video Latte: 16 px, 8 frames, 32 captioned clips, hidden 32."""
    t = dict(global_batch_size=4, max_steps=4, log_every=1, ckpt_every=100, lr=1e-3, ema_decay=0.9,
             precision="fp32", device="cpu", sample_every=0)
    t.update(train)
    return Config(
        model=ModelConfig(name="T2V-Latte-T/4", hidden_size=32, depth=2, num_heads=2),
        objective=ObjectiveConfig(kind="gaussian", prediction="v", schedule="linear", learn_sigma=False),
        data=DataConfig(dataset="moving_digits", image_size=16, num_frames=8, num_items=32, captioned=True,
                        video_label="none"),
        train=TrainConfig(**t),
        run=RunConfig(results_dir=str(tmp_path / "runs"), run_name=name, tensorboard=False),
        sample=SampleConfig(num_sampling_steps=3, cfg_scale=2.0, num_samples=4),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps with a GIF sample grid at step 4 (shared by the sampling tests)."""
    from ditkit.train.loop import train

    return train(tiny_cfg(tmp_path_factory.mktemp("t2v"), "tiny", sample_every=4), log=quiet)


# ---- the model ---------------------------------------------------------------------------------------


def test_prompt_latte_reads_the_caption_in_its_spatial_blocks_only():
    model = PromptDiT(**PROMPT_LATTE_PRESETS["T2V-Latte-T/4"], input_size=16, in_channels=1, num_frames=4)
    latte = model.dit
    assert isinstance(latte, Latte) and latte.y_embedder is None and model.text_encoder is not None
    assert [b.cross_attn is not None for b in latte.blocks] == [True, False, True, False]  # spatial, temporal, ...
    # a new cross-attention adds nothing (zero output projection): the block starts as the identity
    assert all(b.cross_attn.proj.weight.abs().sum() == 0 for b in latte.blocks if b.cross_attn is not None)
    for p in latte.parameters():  # past the zero init: give every layer something to say
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    x, t = torch.randn(2, 1, 4, 16, 16), torch.tensor([100.0, 700.0])
    ids_a = torch.tensor([[2, 97, 32, 51, 0], [2, 97, 32, 55, 0]])  # "[BOS]a 3" / "[BOS]a 7", padded
    ids_b = torch.tensor([[2, 97, 32, 55, 0], [2, 97, 32, 51, 0]])
    out_a, out_b = model(x, t, ids_a), model(x, t, ids_b)
    assert out_a.shape == x.shape
    assert not torch.allclose(out_a, out_b)  # the prompt changes the prediction
    assert torch.allclose(model(x[:1], t[:1], ids_a[:1, :4]), out_a[:1], atol=1e-5)  # padding is masked out
    # frames are not baked in: 8 frames from a model built for 4
    assert model(torch.randn(1, 1, 8, 16, 16), t[:1], ids_a[:1]).shape == (1, 1, 8, 16, 16)
    # the Latte alone takes an encoded prompt and refuses labels
    cond = model.encode(ids_a)
    assert torch.allclose(latte(x, t, cond), out_a, atol=1e-6)
    with pytest.raises(ValueError, match="PromptCondition"):
        latte(x, t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_classes=0"):
        Latte(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
              caption_channels=16)


def test_full_attention_reads_the_caption_in_every_block_and_gradients_reach_the_encoder():
    model = PromptDiT(**{**PROMPT_LATTE_PRESETS["T2V-Latte-T/4"], "depth": 3}, input_size=16, in_channels=1,
                      num_frames=4, attention="full")
    assert all(b.cross_attn is not None for b in model.dit.blocks)
    for p in model.dit.parameters():  # zero-initialised outputs would stop every gradient to the encoder
        torch.nn.init.normal_(p, std=0.05)
    model.train()
    loss = model(torch.randn(2, 1, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.tensor([[2, 97, 0], [2, 98, 99]])).square().mean()
    loss.backward()
    assert model.text_encoder.token_embedding.weight.grad.abs().sum() > 0


# ---- config and data -------------------------------------------------------------------------------------


def test_builder_and_config_checks(tmp_path):
    cfg = tiny_cfg(tmp_path, "x")
    cfg.validate()
    assert cfg.modality == "video"
    cfg.data.channels = 1
    kwargs = model_kwargs(cfg)
    assert kwargs["backbone"] == "latte" and kwargs["num_frames"] == 8 and kwargs["input_size"] == 16
    assert "num_classes" not in kwargs and "class_dropout_prob" not in kwargs and kwargs["caption_dropout"] == 0.1
    assert isinstance(build_model(cfg), PromptDiT)
    cfg.data.captioned = False
    with pytest.raises(ConfigError, match="data.captioned=true"):
        cfg.validate()
    latte = tiny_cfg(tmp_path, "y")
    latte.model.name = "Latte-T/4"
    with pytest.raises(ConfigError, match="use --model T2V-Latte-T/4"):
        latte.validate()
    recipe = get_recipe("moving_digits_captions")
    recipe.validate()
    assert recipe.model.name.startswith("T2V-") and recipe.data.captioned


def test_captioned_moving_digits_pair_each_clip_with_its_caption_ids(tmp_path):
    data = tiny_cfg(tmp_path, "x").data
    ds = load_dataset(data)
    assert ds.images.shape == (32, 1, 8, 16, 16) and ds.labels.shape[0] == 32 and ds.labels.dtype == torch.long
    assert ds.num_classes == 0 and all(t.startswith(("a ", "an ")) and " moving " in t for t in ds.texts)
    assert ds.tokenizer.decode(ds.labels[0].tolist()) == ds.texts[0]
    assert "32 clips of 8 frames" in ds.describe()


def test_a_clip_folder_without_captions_is_refused_with_the_fix(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    import numpy as np

    root = tmp_path / "clips"
    root.mkdir()
    for i in range(3):
        frames = (np.arange(8)[:, None, None, None] * 20 + 40 * i).astype(np.uint8) * np.ones((1, 16, 16, 3), np.uint8)
        iio.imwrite(root / f"c{i}.gif", frames, loop=0)
    (root / "c0.txt").write_text("a grey square")
    data = DataConfig(dataset=str(root), image_size=16, num_frames=8, captioned=True)
    with pytest.raises(DataError, match="2 of 3 clip\\(s\\) have no caption.*allow_uncaptioned"):
        load_dataset(data)
    data.allow_uncaptioned = True
    ds = load_dataset(data)
    assert sorted(ds.texts) == ["", "", "a grey square"]
    for p in root.glob("*.txt"):
        p.unlink()
    with pytest.raises(DataError, match="no clip has a caption"):
        load_dataset(data)


# ---- training, sampling, evaluation, serving ------------------------------------------------------------


def test_training_writes_a_prompt_grid_and_the_tokenizer(trained):
    assert (trained.run_dir / "samples" / "step_0000004.gif").is_file()
    assert (trained.run_dir / "text_tokenizer.json").is_file()


def test_load_returns_the_text_to_video_pipeline_and_draws_clips_per_prompt(trained):
    pipe = ditkit.load(trained.run_dir, device="cpu")
    assert isinstance(pipe, TextToVideoPipeline)
    out = pipe(["a 3 moving up", "a 7 moving left"], num_videos_per_prompt=2, num_inference_steps=2)
    assert out.tensors.shape == (4, 1, 8, 16, 16) and out.labels is None
    assert out.prompts == ["a 3 moving up"] * 2 + ["a 7 moving left"] * 2
    assert out.sample_metadata(2)["prompt"] == "a 7 moving left" and "label" not in out.sample_metadata(2)
    # sample i from seed + i, as every pipeline: the second clip of a call is the first of seed + 1
    again = pipe("a 3 moving up", num_inference_steps=2, seed=1)
    assert torch.allclose(again.tensors[0], out.tensors[1], atol=1e-5)
    gen = pipe("a 3 moving up", num_inference_steps=2, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(gen.tensors, pipe("a 3 moving up", num_inference_steps=2,
                                            generator=torch.Generator().manual_seed(5)).tensors)
    # the negative prompt replaces the empty caption as the guidance reference
    plain = pipe("a 3 moving up", num_inference_steps=2)
    neg = pipe("a 3 moving up", num_inference_steps=2, negative_prompt="a 7 moving left")
    assert not torch.allclose(neg.tensors, plain.tensors)
    assert pipe("a 3 moving up", num_frames=16, num_inference_steps=2).tensors.shape[2] == 16
    with pytest.raises(ConfigError, match="empty prompt"):
        pipe("   ")
    with pytest.raises(ConfigError, match="num-videos-per-prompt 0"):
        pipe("a 3", num_videos_per_prompt=0)


def test_sample_cli_writes_clips_with_their_prompts_and_refuses_image_prompt_flags(trained, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--ckpt", str(trained.run_dir), "--prompt", "a 5 moving down", "--num-videos-per-prompt", "2",
                 "--num-sampling-steps", "2", "--out-dir", str(out)]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert [s["prompt"] for s in meta["samples"]] == ["a 5 moving down"] * 2
    assert (out / "000001.gif").is_file() and (out / "000001.mp4").is_file() and (out / "contact_sheet.png").is_file()
    rc = main(["sample", "--ckpt", str(trained.run_dir), "--prompt", "a 5", "--num-images-per-prompt", "2"])
    assert rc != 0 and "--num-images-per-prompt is for text-to-image models" in capsys.readouterr().err
    rc = main(["sample", "--ckpt", str(trained.run_dir)])
    assert rc != 0 and "needs --prompt" in capsys.readouterr().err


def test_evaluate_video_prompts_every_digit_and_direction(trained, tmp_path, monkeypatch):
    from ditkit.eval.video import VideoJudgeConfig, evaluate_video

    judges = VideoJudgeConfig(image_size=16, digit_train_clips=64, direction_train_clips=32, test_clips=16,
                              digit_epochs=1, direction_epochs=1, width=8)
    pipe = ditkit.load(trained.run_dir, device="cpu")
    calls, draw = [], TextToVideoPipeline.__call__

    def spy(self, prompt, **kwargs):
        calls.append(list(prompt))
        return draw(self, prompt, **kwargs)

    monkeypatch.setattr(TextToVideoPipeline, "__call__", spy)
    report = evaluate_video(pipe, 12, num_sampling_steps=2, cache_dir=tmp_path, judge_config=judges)
    # every (digit, direction) in turn, in the order of the class labels (digit * directions + direction)
    assert calls[0][:5] == ["a 0 moving right", "a 0 moving up", "a 0 moving left", "a 0 moving down", "a 1 moving right"]
    assert report["conditioning"].startswith("prompts")
    for key in ("frame_accuracy", "identity_consistency", "direction_accuracy"):
        assert 0.0 <= report["metrics"][key] <= 1.0


def test_frozen_encoder_states_condition_the_latte(tmp_path):
    """A frozen encoder's ``PromptCondition`` goes straight to the Latte (no encoder inside)."""
    model = PromptDiT(**{**PROMPT_LATTE_PRESETS["T2V-Latte-T/4"], "text_encoder": None}, caption_channels=24,
                      input_size=16, in_channels=1, num_frames=4)
    assert model.text_encoder is None
    cond = PromptCondition(torch.randn(2, 5, 24), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert model(torch.randn(2, 1, 4, 16, 16), torch.tensor([1.0, 2.0]), cond).shape == (2, 1, 4, 16, 16)


def test_serve_draws_clips_from_a_prompt_on_v1_videos(trained, serve_session):
    """``POST /v1/videos`` with ``prompt``: num_samples clips of it, the prompt in each clip's metadata;
    class labels or a missing prompt are a 422 naming what to send."""
    async def talk(client):
        listed = (await client.get("/v1/models")).json()["models"][0]
        ok = await client.post("/v1/videos", json={"model": "t2v", "prompt": "a 3 moving up", "num_samples": 2,
                                                    "num_frames": 4, "steps": 2, "negative_prompt": "a 7"})
        labels = await client.post("/v1/videos", json={"model": "t2v", "class_labels": [3]})
        empty = await client.post("/v1/videos", json={"model": "t2v", "prompt": " "})
        return listed, ok, labels, empty

    listed, ok, labels, empty = serve_session([f"t2v={trained.run_dir}"], talk)
    assert listed["modality"] == "video" and listed["prompts"] is True and listed["max_prompt_tokens"] == 31
    assert ok.status_code == 200, ok.text
    clips = ok.json()["clips"]
    assert [c["metadata"]["prompt"] for c in clips] == ["a 3 moving up"] * 2 and [c["seed"] for c in clips] == [0, 1]
    assert clips[0]["metadata"]["negative_prompt"] == "a 7" and clips[0]["num_frames"] == 4
    assert labels.status_code == 422 and "text-to-video: send prompt, not class_labels" in labels.json()["detail"]
    assert empty.status_code == 422 and "non-empty prompt" in empty.json()["detail"]


# ---- latent video ----------------------------------------------------------------------------------------


def test_latent_video_encodes_frames_once_and_decodes_samples(tmp_path):
    """``--vae`` on a video run: every frame is encoded through the image VAE into the latent cache
    (clips (N, c, F, h, w)), Latte trains on the latents, and the pipeline decodes each sampled frame."""
    diffusers = pytest.importorskip("diffusers")
    from ditkit.data.latents import build_latent_cache
    from ditkit.interop.vae import load_vae
    from ditkit.train.loop import train

    vae = tmp_path / "vae"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                                latent_channels=4, norm_num_groups=4, sample_size=16).save_pretrained(vae)
    cfg = tiny_cfg(tmp_path, "latent", max_steps=2, sample_every=2)
    cfg.data.vae = str(vae)
    # the cache: frame by frame, the same moments as encoding the frames as images
    dataset = load_dataset(cfg.data)
    cache = build_latent_cache(dataset, load_vae(vae), tmp_path / "cache", batch_size=16)
    assert cache.latent_shape == (4, 8, 8, 8)  # (c, F, h, w): 16 px frames at 2x down
    frames = dataset.images[:2].float().div(127.5).sub(1).transpose(1, 2).reshape(16, 1, 16, 16)
    mean, _ = load_vae(vae).encode_moments(frames)
    got, _ = cache.moments(torch.tensor([0, 1]))
    assert torch.allclose(got, mean.view(2, 8, 4, 8, 8).transpose(1, 2), atol=1e-5)
    with pytest.raises(DataError, match="hflip"):
        build_latent_cache(dataset, load_vae(vae), tmp_path / "cache2", hflip=True)

    run = train(cfg, log=quiet)
    saved = json.loads((run.run_dir / "config.json").read_text())["data"]
    assert saved["latent_channels"] == 4 and saved["vae_downsample"] == 2
    assert (run.run_dir / "samples" / "step_0000002.gif").is_file()
    pipe = ditkit.load(run.run_dir, device="cpu")
    assert pipe.model.dit.in_channels == 4 and pipe.model.dit.input_size == 8
    out = pipe("a 3 moving up", num_inference_steps=2)
    assert out.tensors.shape == (1, 1, 8, 16, 16)  # decoded pixel frames, not (1, 4, 8, 8, 8) latents
    assert out.metadata["vae"] == str(vae)
    traced = pipe("a 3 moving up", num_inference_steps=2, trajectory_points=2)  # x0 and x_t decoded like the clips
    assert traced.trajectory.shape == traced.trajectory_xt.shape == (1, 2, 1, 8, 16, 16)
    assert torch.allclose(traced.trajectory[0, -1], traced.tensors[0], atol=1e-4)  # the last x0 is the sample


# ---- FVD with the user's I3D -----------------------------------------------------------------------------


class _StandInI3D(torch.nn.Module):
    """A TorchScript module with the I3D call signature (the real weights cannot be shipped or
    downloaded here): a 3-D convolution pooled to 400 numbers, so the protocol around it is tested."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 400, kernel_size=(2, 16, 16), stride=(2, 16, 16))

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        assert x.shape[1:] == (3, x.shape[2], 224, 224)
        return self.conv(x).mean(dim=(2, 3, 4))


def test_fvd_needs_the_users_i3d_and_follows_the_protocol(trained, tmp_path, capsys):
    from ditkit.eval.fvd import fvd, load_i3d, preprocess_for_i3d
    from ditkit.eval.video import VideoJudgeConfig, evaluate_video

    clips = torch.rand(2, 1, 4, 16, 24) * 2 - 1
    x = preprocess_for_i3d(clips)
    assert x.shape == (2, 3, 4, 224, 224) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 2])  # gray repeated to RGB
    with pytest.raises(ConfigError, match="--i3d-weights .*no such file"):
        load_i3d(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ConfigError, match="is not a TorchScript I3D"):
        load_i3d(tmp_path / "junk.pt")
    torch.manual_seed(0)
    torch.jit.script(_StandInI3D()).save(str(tmp_path / "i3d.pt"))
    detector = load_i3d(tmp_path / "i3d.pt")
    real = torch.rand(12, 1, 4, 16, 16) * 2 - 1
    assert fvd(detector, real, real) < 1e-6 < fvd(detector, real.flip(2).clamp(-0.2, 0.2), real)

    judges = VideoJudgeConfig(image_size=16, digit_train_clips=64, direction_train_clips=32, test_clips=16,
                              digit_epochs=1, direction_epochs=1, width=8)
    short = ditkit.load(trained.run_dir, device="cpu")  # 8 frames: too short for the I3D, refused before drawing
    with pytest.raises(ConfigError, match="at least 10 frames.*data.num_frames=16"):
        evaluate_video(short, 10, cache_dir=tmp_path, judge_config=judges, i3d_weights=tmp_path / "i3d.pt")
    from ditkit.train.loop import train

    cfg = tiny_cfg(tmp_path, "ten")
    cfg.data.num_frames = 10
    pipe = ditkit.load(train(cfg, log=quiet).run_dir, device="cpu")
    report = evaluate_video(pipe, 10, num_sampling_steps=2, cache_dir=tmp_path, judge_config=judges,
                            i3d_weights=tmp_path / "i3d.pt")
    assert report["metrics"]["fvd"] > 0 and report["real"]["fvd_real_vs_real"] >= 0
    assert report["fvd"]["comparable_to_published"] is False and len(report["fvd"]["i3d_sha256"]) == 64
    without = evaluate_video(short, 10, num_sampling_steps=2, cache_dir=tmp_path, judge_config=judges)
    assert "fvd" not in without["metrics"] and "fvd" not in without
    rc = main(["eval", "--ckpt", str(trained.run_dir), "--i3d-weights", str(tmp_path / "nope.pt"), "--num-samples", "10"])
    err = capsys.readouterr().err
    assert rc != 0 and "--i3d-weights" in err and "no such file" in err


def _caption_folder(root, n=4):
    """``n`` 8-frame GIF clips with a caption each (a brighter square each)."""
    import numpy as np

    iio = pytest.importorskip("imageio.v3")
    root.mkdir()
    for i in range(n):
        frames = (np.arange(8)[:, None, None, None] * 10 + 30 * i).astype(np.uint8) * np.ones((1, 16, 16, 3), np.uint8)
        iio.imwrite(root / f"c{i}.gif", frames, loop=0)
        (root / f"c{i}.txt").write_text(f"a square of level {i}")
    return root


@pytest.mark.parametrize("model", ["T2V-Latte-T/4", "Latte-T/4"])
def test_train_cli_on_a_clip_folder_picks_the_video_recipe(tmp_path, model):
    """``ditkit train --data clips/ --set data.num_frames=8 [--model ...]``: a video recipe, captions
    for a text-to-video model (its sample grid prompts are the folder's captions)."""
    from ditkit.data.video import training_prompts

    root = _caption_folder(tmp_path / "clips")
    args = ["train", "--data", str(root), "--set", "data.num_frames=8", "--model", model, "--image-size", "16",
            "--max-steps", "1", "--global-batch-size", "2", "--results-dir", str(tmp_path / "runs"), "--run-name", "r",
            "--set", "train.sample_every=0", "--set", "run.tensorboard=false"]
    assert main(args) == 0
    saved = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert saved["model"]["name"] == model and saved["data"]["captioned"] == model.startswith("T2V-")
    assert training_prompts(DataConfig(dataset=str(root), num_frames=8), count=2) == ["a square of level 0",
                                                                                      "a square of level 1"]


def test_guidance_against_a_null_condition_is_exact():
    from ditkit.samplers.guidance import classifier_free_guidance

    def model(x, t, y):  # a different constant per condition row and channel
        return x + y.float().sum(1).view(-1, 1, 1, 1) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1) + t.view(-1, 1, 1, 1)

    y, null = torch.tensor([[2, 5], [2, 7]]), torch.tensor([[2, 0], [2, 1]])
    x, t = torch.zeros(2, 2, 1, 1), torch.tensor([1.0, 2.0])
    out = classifier_free_guidance(model, y, 3.0, y_null=null, guide_channels=1)(x, t)
    cond, uncond = model(x, t, y), model(x, t, null)
    assert torch.allclose(out[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]))
    assert torch.allclose(out[:, 1:], cond[:, 1:])  # unguided channels ride with the conditional half
    with pytest.raises(ValueError, match="exactly one of"):
        classifier_free_guidance(model, y, 3.0, null_class=0, y_null=null)
    with pytest.raises(ValueError, match="1 rows for 2"):
        classifier_free_guidance(model, y, 3.0, y_null=null[:1])


def test_the_pipeline_guides_against_the_encoded_negative_prompt(trained, monkeypatch):
    """The second half of every guided batch is the negative prompt (default the empty caption)."""
    pipe = ditkit.load(trained.run_dir, device="cpu")
    seen = []

    def fake_forward():
        def forward(x, t, y):
            seen.append(y)
            return torch.zeros_like(x)
        return forward

    monkeypatch.setattr(pipe, "forward_fn", fake_forward)
    pipe(["a 3 moving up", "a 7"], num_inference_steps=1, negative_prompt="a 1 moving left")
    ids = pipe.tokenizer(["a 3 moving up", "a 7", "a 1 moving left", "a 1 moving left"])[0]
    y = seen[0]
    assert y.shape[0] == 4  # (prompt, prompt, negative, negative), padded to one length
    for row, want in zip(y, ids):
        n = int((want != pipe.tokenizer.pad_id).sum())
        assert torch.equal(row[:n], want[:n]) and (row[n:] == pipe.tokenizer.pad_id).all()
    seen.clear()
    pipe("a 3 moving up", num_inference_steps=1)
    assert (seen[0][1, 1:] == pipe.tokenizer.pad_id).all() and seen[0][1, 0] == 2  # the empty caption: [BOS]


def test_attention_maps_per_word_and_frame_from_the_pipeline_and_the_cli(trained, tmp_path):
    """DAAM for clips: per clip and prompt word a heat map in every frame, recorded without changing
    the samples; ``ditkit sample --attention-maps`` writes a sheet per clip."""
    from types import SimpleNamespace

    from PIL import Image

    from ditkit.pipelines.prompt import AttentionMaps

    pipe = ditkit.load(trained.run_dir, device="cpu")
    prompts = ["a 3 moving up", "a 7 moving left"]
    out = pipe(prompts, num_inference_steps=2, attention_maps=True)
    assert torch.allclose(out.tensors, pipe(prompts, num_inference_steps=2).tensors, atol=1e-4)  # recording: same draw
    assert [[w for w, _ in clip] for clip in out.attention_maps] == [["a", "3", "moving", "up"], ["a", "7", "moving", "left"]]
    heat = out.attention_maps[0][1][1]
    assert heat.shape == (8, 16, 16) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert not torch.allclose(heat[0], heat[-1])  # a map per frame, not one map repeated
    # the recorder reads the spatial blocks' tokens in (frame, patch) order: token f*g*g + n is frame f
    layer = SimpleNamespace(attention_store=None)
    recorder = AttentionMaps([layer], leading=(3,))
    frame_of_token = torch.arange(3).repeat_interleave(4).float()  # 3 frames of a 2x2 grid
    probs = frame_of_token.view(1, 1, 12, 1).expand(2, 2, 12, 5)  # (B, heads, F*g*g, L)

    def forward(x, t, y):
        layer.attention_store.append(probs)
        return x

    with recorder.batch(0, 2):
        recorder.wrap(forward)(torch.zeros(2), None, None)
    (maps,) = recorder.maps
    assert maps.shape == (2, 3, 2, 2, 5) and torch.equal(maps[:, 2], torch.full((2, 2, 2, 5), 2.0))
    # a tubelet model's F' token frames are repeated to the clip's frames
    recorder.maps = [torch.rand(1, 2, 4, 4, 6)]
    ((word, tubelet_heat), *_), = pipe.word_attention_maps(recorder, ["a 3 moving up"], 16, frames=4)
    assert word == "a" and tubelet_heat.shape == (4, 16, 16) and torch.equal(tubelet_heat[0], tubelet_heat[1])
    # the CLI: NNNNNN_attention.png per clip, the clip's row then one row per word
    sheet_dir = tmp_path / "maps"
    assert main(["sample", "--ckpt", str(trained.run_dir), "--prompt", "a 5 moving down", "--num-videos-per-prompt", "2",
                 "--num-sampling-steps", "2", "--attention-maps", "--out-dir", str(sheet_dir)]) == 0
    for i in range(2):
        sheet = Image.open(sheet_dir / f"{i:06d}_attention.png")
        assert sheet.height == 5 * (16 * 4 + 2) and "cross-attention map" in sheet.text["layout"]
        assert sheet.text["prompt"] == "a 5 moving down"


def test_attention_maps_keep_each_frame_apart_in_a_real_latte():
    """The recorder's (frame, patch) reading matches Latte's token order: in a T2V-Latte whose first
    (spatial, cross-attending) block runs before any temporal mixing, changing only the last frame of
    the input changes only the last frame's attention map of one network call."""
    from ditkit.pipelines.prompt import AttentionMaps

    torch.manual_seed(0)
    model = PromptDiT(backbone="latte", input_size=16, in_channels=1, patch_size=4, hidden_size=32, depth=2,
                      num_heads=2, num_classes=0, learn_sigma=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    recorder = AttentionMaps(model.cross_attention_modules(), leading=(4,))
    ids = torch.tensor([[2, 10, 11, 12]])
    x = torch.randn(1, 1, 4, 16, 16)
    changed = x.clone()
    changed[:, :, 3] = torch.randn(1, 1, 16, 16)
    for clip in (x, changed):
        with recorder.batch(0, 1), torch.no_grad():
            recorder.wrap(model)(clip, torch.tensor([500.0]), ids)
    before, after = recorder.maps  # (1, F, g, g, L) each
    assert torch.equal(before[:, :3], after[:, :3]) and not torch.allclose(before[:, 3], after[:, 3])


def test_init_from_a_run_of_another_layout_or_without_its_tokenizer_is_refused(tmp_path):
    from ditkit.train.loop import train

    source = train(tiny_cfg(tmp_path, "source", max_steps=1), log=quiet).run_dir
    rope = tiny_cfg(tmp_path, "rope", max_steps=1, init_from=str(source))
    rope.model.pos_embed = "rope"  # the same tensors, another computation
    with pytest.raises(ConfigError, match=r"model.pos_embed='sincos' and this run asks for 'rope'"):
        train(rope, log=quiet)
    for path in source.rglob("text_tokenizer.json"):
        path.unlink()
    with pytest.raises(ConfigError, match="holds no text_tokenizer.json"):
        train(tiny_cfg(tmp_path, "lost", max_steps=1, init_from=str(source)), log=quiet)
