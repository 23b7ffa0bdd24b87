"""Video end to end: config and modality, the Latte builder, ``moving_digits`` and video folders
through ``load_dataset`` and the trainer (bad files included) with exact resume, GIF sample grids,
``ditkit.load(run)(num_frames=16)`` on a model trained on 8, ``ditkit sample`` GIF + MP4 + contact
sheet, and the judges' evaluation of a run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("mlxtend")
iio = pytest.importorskip("imageio.v3")
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
from ditkit.data import load_dataset  # noqa: E402
from ditkit.data.video import VideoDataset  # noqa: E402
from ditkit.models.latte import Latte  # noqa: E402
from ditkit.pipelines.video import VideoPipeline, VideoPipelineOutput  # noqa: E402
from ditkit.recipes import get_recipe  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

quiet = lambda m: None  # noqa: E731


def tiny_cfg(tmp_path, name, dataset="moving_digits", **train):
    """A seconds-long Latte: 16 px, 8 frames, 32 clips, hidden 32, one spatial + one temporal block."""
    t = dict(global_batch_size=4, max_steps=4, log_every=1, ckpt_every=100, lr=1e-3, ema_decay=0.9,
             precision="fp32", device="cpu", sample_every=0)
    t.update(train)
    return Config(
        model=ModelConfig(name="Latte-T/4", hidden_size=32, depth=2, num_heads=2, class_dropout_prob=0.1),
        objective=ObjectiveConfig(kind="gaussian", schedule="cosine", learn_sigma=False),
        data=DataConfig(dataset=str(dataset), image_size=16, num_frames=8, num_items=32),
        train=TrainConfig(**t),
        run=RunConfig(results_dir=str(tmp_path / "runs"), run_name=name, tensorboard=False),
        sample=SampleConfig(num_sampling_steps=3, cfg_scale=1.5, num_samples=4),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps with a GIF sample grid at step 4 (shared by the sampling tests)."""
    from ditkit.train.loop import train

    return train(tiny_cfg(tmp_path_factory.mktemp("run"), "tiny", sample_every=4), log=quiet)


def gif_frames(path) -> list[np.ndarray]:
    with Image.open(path) as im:
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(np.asarray(im.convert("L")))
        return out


# ---- config: modality, checks, builder -------------------------------------------------------------


def test_video_modality_comes_from_the_latte_family_and_the_recipe_validates(tmp_path):
    cfg = get_recipe("moving_digits")
    assert cfg.modality == "video" and cfg.model.name.startswith("Latte")
    cfg.validate()
    assert tiny_cfg(tmp_path, "x").modality == "video"
    assert get_recipe("digits").modality == "image" and get_recipe("text_sums").modality == "text"


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.data, "hflip", True), "hflip=false"),
    (lambda c: setattr(c.data, "dataset", "/nowhere/clips"), "moving_digits nor an existing folder"),
    (lambda c: setattr(c.data, "num_frames", 1), "at least 2 frames"),
    (lambda c: setattr(c.model, "attention", "diagonal"), "interleaved or full"),
    (lambda c: setattr(c.model, "tubelet_size", 3), "divisor of data.num_frames=8"),
])
def test_video_config_errors_say_what_to_change(tmp_path, change, message):
    cfg = tiny_cfg(tmp_path, "x")
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_video_folder_needs_a_clip_length_and_image_models_refuse_video_options(tmp_path):
    cfg = tiny_cfg(tmp_path, "x", dataset=tmp_path)
    cfg.data.num_frames = None
    with pytest.raises(ConfigError, match="data.num_frames=16"):
        cfg.validate()
    image = get_recipe("digits")
    image.data.num_frames = 8
    with pytest.raises(ConfigError, match="data.num_frames: video options"):
        image.validate()


def test_builder_takes_sizes_from_the_data_section(tmp_path):
    cfg = tiny_cfg(tmp_path, "x")
    cfg.data.channels, cfg.data.num_classes = 1, 40
    cfg.model.attention, cfg.model.tubelet_size = "full", 2
    kwargs = model_kwargs(cfg)
    assert (kwargs["input_size"], kwargs["num_frames"], kwargs["in_channels"], kwargs["num_classes"]) == (16, 8, 1, 40)
    model = build_model(cfg)
    assert isinstance(model, Latte) and model.attention == "full" and model.tubelet_size == 2 and not model.learn_sigma
    out = model(torch.randn(2, 1, 8, 16, 16), torch.tensor([1.0, 500.0]), torch.tensor([0, 39]))
    assert out.shape == (2, 1, 8, 16, 16)
    cfg.data.image_size = 18
    with pytest.raises(ConfigError, match="--image-size 16 or 20"):
        model_kwargs(cfg)


# ---- data ------------------------------------------------------------------------------------------


def test_load_dataset_dispatches_moving_digits(tmp_path):
    cfg = tiny_cfg(tmp_path, "x").data
    ds = load_dataset(cfg)
    assert isinstance(ds, VideoDataset) and ds.images.dtype == torch.uint8
    assert ds.images.shape == (32, 1, 8, 16, 16) and ds.num_classes == 40 and ds.class_names[13] == "3 up"
    digit, direction = ds.attributes["digit"][:, 0], ds.attributes["direction"][:, 0]
    assert torch.equal(ds.labels, digit * 4 + direction)
    assert "32 clips of 8 frames 16x16x1, 40 classes" in ds.describe()
    cfg.max_items, cfg.num_classes, cfg.channels = 5, 0, 3
    small = load_dataset(cfg)
    assert small.labels is None and small.images.shape == (5, 3, 8, 16, 16)
    assert torch.equal(small.images[:, 0], ds.images[:5, 0]) and torch.equal(small.images[:, 2], ds.images[:5, 0])
    cfg.num_classes, cfg.video_label = None, "direction"
    assert load_dataset(cfg).num_classes == 4


def write_clip(path, frames: int, size: tuple[int, int], level: int = 200) -> None:
    """A gray square moving right (H.264 needs even sizes)."""
    h, w = size
    video = np.zeros((frames, h, w, 3), np.uint8)
    for f in range(frames):
        video[f, h // 4 : h // 2, f : f + w // 4] = level
    iio.imwrite(path, video, plugin="pyav", codec="libx264", fps=8)


def test_training_on_a_video_folder_with_bad_files(tmp_path):
    """Corrupt and zero-length files are skipped, a short clip loops, mixed sizes are cropped:
    counted, one warning each; the run trains and writes its config."""
    from ditkit.train.loop import train

    root = tmp_path / "clips"
    for name in ("left", "right"):
        (root / name).mkdir(parents=True)
        for k in range(3):
            write_clip(root / name / f"{k}.mp4", 10, (32, 48) if k else (24, 24))
    write_clip(root / "left" / "short.mp4", 3, (32, 32))
    (root / "right" / "zero.mp4").write_bytes(b"")
    (root / "right" / "broken.webm").write_bytes(b"\x1aE\xdf\xa3 not really a video")
    cfg = tiny_cfg(tmp_path, "folder", dataset=root, max_steps=2)
    cfg.data.num_frames = 4
    with pytest.warns(UserWarning) as caught:
        run = train(cfg, log=quiet)
    said = " | ".join(str(w.message) for w in caught)
    assert "skipped 2 unreadable or empty clip(s)" in said and "1 clip(s)" in said and "padded by looping" in said
    saved = json.loads((run.run_dir / "config.json").read_text())["data"]
    assert saved["class_names"] == ["left", "right"] and saved["channels"] == 1 and run.step == 2


def test_a_folder_without_videos_is_one_line_from_the_cli(tmp_path, capsys):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    (tmp_path / "empty" / "notes" / "readme.md").write_text("no clips here")
    rc = main(["train", "--recipe", "moving_digits", "--data", str(tmp_path / "empty"), "--set", "data.num_frames=4",
               "--max-steps", "1", "--results-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc != 0 and "no video clips under" in err and "Traceback" not in err
    assert not list((tmp_path / "runs").glob("*/checkpoints/*"))  # nothing written half


# ---- training and resume ---------------------------------------------------------------------------


def test_training_resumes_bitwise_exactly(tmp_path):
    from ditkit.train.loop import train

    straight = train(tiny_cfg(tmp_path, "straight"), log=quiet)
    stopped = train(tiny_cfg(tmp_path, "resumed"), stop_at_step=2, log=quiet)
    assert stopped.step == 2
    resumed = train(tiny_cfg(tmp_path, "resumed"), resume=stopped.run_dir, log=quiet)
    assert resumed.step == straight.step == 4
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(straight.checkpoint / file)), load_file(str(resumed.checkpoint / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((straight.run_dir / "config.json").read_text())
    assert saved["data"]["num_frames"] == 8 and saved["data"]["channels"] == 1 and len(saved["data"]["class_names"]) == 40


def test_training_writes_an_animated_gif_grid(trained):
    frames = gif_frames(trained.run_dir / "samples" / "step_0000004.gif")
    # 4 clips in a 2 x 2 grid of 16 px clips, 2 px apart, shown at 4x (display_scale(16)); 8 frames
    # (Pillow may merge identical consecutive frames: never more than 8)
    assert 2 <= len(frames) <= 8 and frames[0].shape == (4 * (2 * 18 + 2),) * 2


# ---- sampling: ditkit.load and ditkit sample ---------------------------------------------------------


def test_load_returns_the_video_pipeline_and_runs_16_frames_on_an_8_frame_model(trained):
    pipe = ditkit.load(trained.run_dir, device="cpu")
    assert isinstance(pipe, VideoPipeline) and pipe.trained_frames == 8
    calls = []
    out = pipe(class_labels=["3 up", 7], num_frames=16, num_inference_steps=3, progress=calls.append)
    assert isinstance(out, VideoPipelineOutput)
    assert out.tensors.shape == (2, 1, 16, 16, 16) and out.tensors.abs().max() <= 1 and torch.isfinite(out.tensors).all()
    assert out.labels == [13, 7] and len(out.frames) == 2 and len(out.frames[0]) == 16
    assert out.frames[0][5].size == (16, 16) and out.frames[0][5].mode == "L"
    assert out.metadata["num_frames"] == "16" and out.metadata["trained_frames"] == "8"
    assert sum(calls) == 16 * 3  # progress over frames x steps
    again = pipe(class_labels=[13], num_frames=16, num_inference_steps=3)  # clip 0 depends on its seed only
    assert torch.equal(again.tensors[0], out.tensors[0])
    default = pipe(class_labels=[1], num_inference_steps=2)
    assert default.tensors.shape[2] == 8
    with pytest.raises(ConfigError, match="--num-frames 1"):
        pipe(class_labels=[1], num_frames=1)
    with pytest.raises(ConfigError, match="outside this checkpoint's classes"):
        pipe(class_labels=[40])


def test_sample_cli_writes_gif_mp4_and_contact_sheet(trained, tmp_path):
    out_dir = tmp_path / "threes"
    rc = main(["sample", "--ckpt", str(trained.run_dir), "--class-labels", "3", "--num-samples", "2",
               "--num-sampling-steps", "2", "--num-frames", "8", "--out-dir", str(out_dir), "--device", "cpu"])
    assert rc in (0, None)
    for i in range(2):
        assert 2 <= len(gif_frames(out_dir / f"{i:06d}.gif")) <= 8
        video = iio.imread(out_dir / f"{i:06d}.mp4", plugin="pyav")
        assert video.shape == (8, 64, 64, 3)  # 16 px shown at 4x
    with Image.open(out_dir / "contact_sheet.png") as sheet:
        assert sheet.size == (4 * (8 * 18 + 2), 4 * (2 * 18 + 2)) and sheet.text["model"] == "Latte-T/4"
    meta = json.loads((out_dir / "metadata.json").read_text())
    assert [s["class_name"] for s in meta["samples"]] == ["0 down", "0 down"] and meta["shared"]["fps"] == "8"
    assert not list(out_dir.glob(".*"))  # nothing half written


def test_trajectory_records_clean_and_noisy_clips_per_step(trained, tmp_path):
    """Issue 20: --trajectory for video: K steps of predicted clean clips and noisy states per clip,
    a contact sheet per clip; the clips themselves are the same as without the option."""
    pipe = ditkit.load(trained.run_dir, device="cpu")
    plain = pipe(class_labels=[3, 5, 7], num_inference_steps=4, batch_size=2)
    out = pipe(class_labels=[3, 5, 7], num_inference_steps=4, batch_size=2, trajectory_points=3)
    assert torch.equal(plain.tensors, out.tensors)
    assert out.trajectory_steps == [0, 2, 3] and out.trajectory.shape == (3, 3, *out.tensors.shape[1:])
    assert out.trajectory_xt.shape == out.trajectory.shape
    # the noisy state at the first recorded step is far from the end, the last one is the clip itself
    assert torch.allclose(out.trajectory_xt[:, -1], out.tensors, atol=1e-6)
    assert not torch.allclose(out.trajectory_xt[:, 0], out.tensors, atol=0.1)
    rc = main(["sample", "--ckpt", str(trained.run_dir), "--class-labels", "3", "--num-samples", "1",
               "--num-sampling-steps", "4", "--trajectory", "--trajectory-points", "2", "--out-dir", str(tmp_path / "t"),
               "--device", "cpu"])
    assert rc in (0, None)
    with Image.open(tmp_path / "t" / "000000_trajectory.png") as sheet:  # 2 steps x (x0, x_t) rows of 8 frames
        assert sheet.size == (4 * (8 * 18 + 2), 4 * (4 * 18 + 2)) and sheet.text["trajectory_steps"] == "0 3"


def test_sample_cli_refuses_video_flags_for_image_checkpoints(tmp_path, capsys):
    from ditkit.train.loop import train

    cfg = get_recipe("shapes_tiny")
    cfg.train.max_steps = 1
    cfg.run = RunConfig(results_dir=str(tmp_path), run_name="img", tensorboard=False)
    run = train(cfg, log=quiet)
    rc = main(["sample", "--ckpt", str(run.run_dir), "--num-frames", "8", "--out-dir", str(tmp_path / "o")])
    assert rc != 0 and "--num-frames is for text-to-video and video models" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- evaluation ----------------------------------------------------------------------------------------


def test_evaluate_video_scores_a_run_with_tiny_judges(trained, tmp_path):
    from ditkit.eval.video import VideoJudgeConfig, evaluate_video, requested_attributes

    digits, directions = requested_attributes([13, 39, 0], "digit_direction", 4)
    assert digits.tolist() == [3, 9, 0] and directions.tolist() == [1, 3, 0]
    assert requested_attributes([5], "digit", 4)[1] is None
    judges = VideoJudgeConfig(image_size=16, digit_train_clips=64, direction_train_clips=32, test_clips=16,
                              digit_epochs=1, direction_epochs=1, width=8)
    pipe = ditkit.load(trained.run_dir, device="cpu")
    report = evaluate_video(pipe, 12, num_sampling_steps=2, cache_dir=tmp_path, judge_config=judges)
    m, real = report["metrics"], report["real"]
    for key in ("frame_accuracy", "identity_consistency", "direction_accuracy"):
        assert 0.0 <= m[key] <= 1.0 and 0.0 <= real[key] <= 1.0
    assert m["fd_clip_judge"] >= 0 and real["fd_real_vs_real"] >= 0 and report["num_frames"] == 8
    assert report["judges"]["hash"] and list(tmp_path.glob("video-judges-*/judges.json"))
    with pytest.raises(ConfigError, match="judge_config is for 16 px and 8 directions"):
        evaluate_video(pipe, 12, cache_dir=tmp_path, judge_config=VideoJudgeConfig(image_size=16, num_directions=8))


def test_eval_cli_refuses_image_flags_for_a_video_run(trained, tmp_path, capsys):
    rc = main(["eval", "--ckpt", str(trained.run_dir), "--inception-weights", str(tmp_path), "--num-samples", "10"])
    assert rc != 0 and "--inception-weights is not an option of video evaluation" in capsys.readouterr().err
    rc = main(["eval", "--ckpt", str(trained.run_dir), "--vae", str(tmp_path), "--num-samples", "10"])
    assert rc != 0 and "pixel-space model; drop --vae" in capsys.readouterr().err  # --vae is for latent video runs


# ---- serving ---------------------------------------------------------------------------------------


def test_serve_answers_gifs_on_v1_videos(trained, serve_session):
    """``POST /v1/videos``: looping GIFs of the asked frames and a contact sheet per clip; the
    frame count checked by the pipeline (422 naming num_frames), the wrong endpoint refused."""
    import base64
    import io

    async def talk(client):
        listed = (await client.get("/v1/models")).json()["models"][0]
        ok = await client.post("/v1/videos", json={"model": "clips", "class_labels": ["3 up"], "num_samples": 2,
                                                    "num_frames": 4, "steps": 2, "fps": 5.0, "request_id": "v-1"})
        progress = await client.get("/v1/progress/v-1")
        odd = await client.post("/v1/videos", json={"model": "clips", "num_frames": 1})
        too_many = await client.post("/v1/videos", json={"model": "clips", "num_frames": 64})
        wrong_door = await client.post("/v1/images", json={"model": "clips"})
        return listed, ok, progress, odd, too_many, wrong_door

    listed, ok, progress, odd, too_many, wrong_door = serve_session([f"clips={trained.run_dir}"], talk)
    assert listed["modality"] == "video" and listed["trained_frames"] == 8 and listed["defaults"]["num_frames"] == 8
    assert ok.status_code == 200, ok.text
    clips = ok.json()["clips"]
    assert [c["class_name"] for c in clips] == ["3 up", "3 up"] and [c["seed"] for c in clips] == [0, 1]
    with Image.open(io.BytesIO(base64.b64decode(clips[0]["gif_base64"]))) as gif:
        assert gif.format == "GIF" and gif.size == (64, 64) and 2 <= gif.n_frames <= 4  # 16 px at 4x; still frames merge
        assert gif.info["duration"] == 200  # 5 frames a second
    with Image.open(io.BytesIO(base64.b64decode(clips[0]["contact_sheet_png_base64"]))) as sheet:
        assert sheet.size == (4 * (4 * 18 + 2), 4 * 20) and sheet.text["fps"] == "5"
    assert progress.json()["total"] == progress.json()["done"] == 4 * 2  # frames x steps, one batch
    assert odd.status_code == 422 and "num_frames 1" in odd.json()["detail"]
    assert too_many.status_code == 422 and "max_frames" in too_many.json()["detail"]
    assert wrong_door.status_code == 422 and "/v1/videos" in wrong_door.text
