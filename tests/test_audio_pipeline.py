"""Audio end to end: config and modality, the audio DiT builder, training on a folder of sounds
(bad files included) with exact resume, ``ditkit.load(run)(...)``, ``ditkit sample`` WAV + PNG."""

import json
import warnings

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile")
pytest.importorskip("librosa")

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
from ditkit.data.audio import MelDataset, loudness_normalise, mel_spec_of, waveform_to_logmel  # noqa: E402
from ditkit.pipelines.audio import AudioPipeline, AudioPipelineOutput  # noqa: E402
from ditkit.recipes import get_recipe  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

SR = 4000  # tiny settings: 1 s = 16 frames of hop 250, 16 mel bins, so the spectrogram is 16 x 16
FREQS = (300.0, 600.0, 1200.0)


def tone(freq: float, seconds: float = 1.0, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_tones(root, bad: bool = False):
    """One sub-folder of tones per class; with ``bad`` also files of every awkward kind."""
    for f in FREQS:
        d = root / f"tone{int(f)}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(4):
            sf.write(d / f"{k}.wav", tone(f * (1 + 0.01 * k)), SR)
    if bad:
        d = root / "tone300"
        sf.write(d / "u8.wav", tone(300), SR, subtype="PCM_U8")
        sf.write(d / "s24.wav", tone(300), SR, subtype="PCM_24")
        sf.write(d / "float.wav", tone(300), SR, subtype="FLOAT")
        sf.write(d / "stereo_44k.wav", np.stack([tone(300, sr=44100)] * 2, axis=1), 44100)  # 2 channels, odd rate
        sf.write(d / "short.wav", tone(300, 0.3), SR)  # shorter than the duration: padded
        sf.write(d / "silent.wav", np.zeros(SR, np.float32), SR)
        sf.write(d / "empty.wav", np.zeros(0, np.float32), SR)  # a valid WAV with no samples
        (d / "zero_bytes.wav").write_bytes(b"")
        (d / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    return root


def tiny_cfg(tmp_path, data, name, **train):
    t = dict(global_batch_size=4, max_steps=5, log_every=1, ckpt_every=100, lr=1e-3, ema_decay=0.9,
             precision="fp32", device="cpu", sample_every=0)
    t.update(train)
    return Config(
        model=ModelConfig(name="AudioDiT-T/2", hidden_size=32, depth=2, num_heads=2, class_dropout_prob=0.1),
        objective=ObjectiveConfig(kind="gaussian", schedule="cosine", learn_sigma=False),
        data=DataConfig(dataset=str(data), image_size=16, sample_rate=SR, n_mels=16, n_fft=256, hop_length=250),
        train=TrainConfig(**t),
        run=RunConfig(results_dir=str(tmp_path / "runs"), run_name=name, tensorboard=False),
        sample=SampleConfig(num_sampling_steps=4, cfg_scale=1.5, num_samples=3),
    )


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    return write_tones(tmp_path_factory.mktemp("tones"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tones):
    """A run of 5 steps with sample strips at step 5 (shared by the sampling tests)."""
    from ditkit.train.loop import train

    tmp = tmp_path_factory.mktemp("run")
    return train(tiny_cfg(tmp, tones, "tiny", sample_every=5), log=lambda m: None)


# ---- config: the modality of a run, checks, the builder --------------------------------------------


def test_audio_modality_comes_from_the_model_family_and_others_are_unchanged(tones, tmp_path):
    cfg = tiny_cfg(tmp_path, tones, "x")
    assert cfg.modality == "audio"
    cfg.validate()
    assert Config().modality == "image"
    assert get_recipe("text_sums").modality == "text"
    assert get_recipe("spoken_digits").modality == "audio"
    text_model_gaussian = get_recipe("text_sums")
    text_model_gaussian.objective.kind = "gaussian"  # a TextDiT cannot learn a continuous objective
    text_model_gaussian.data.dataset = "digits"
    with pytest.raises(ConfigError, match="text model"):
        text_model_gaussian.validate()


def test_audio_config_errors_say_what_to_change(tones, tmp_path):
    cfg = tiny_cfg(tmp_path, tones, "x")
    cfg.data.hflip = True
    with pytest.raises(ConfigError, match="hflip=false"):
        cfg.validate()
    cfg = tiny_cfg(tmp_path, tmp_path / "nowhere", "x")
    with pytest.raises(ConfigError, match="spoken_digits nor an existing folder"):
        cfg.validate()
    cfg = tiny_cfg(tmp_path, tones, "x")
    cfg.data.duration, cfg.data.num_classes = 1.0625, 3  # 17 frames: not whole patches of 2
    with pytest.raises(ConfigError, match=r"multiple of 0.125 s \(e.g. 1 or 1.125\)"):
        model_kwargs(cfg)


def test_builder_takes_sizes_from_the_data_section(tones, tmp_path):
    cfg = tiny_cfg(tmp_path, tones, "x")
    cfg.data.num_classes = 3
    model = build_model(cfg)
    assert (model.n_mels, model.num_classes, model.frames_per_second, model.hidden_size) == (16, 3, 16.0, 32)
    out = model(torch.randn(2, 16, 16), torch.tensor([1.0, 500.0]), torch.tensor([0, 2]))
    assert out.shape == (2, 16, 16)


# ---- data ------------------------------------------------------------------------------------------


def test_load_dataset_dispatches_audio_folders_and_skips_bad_files(tmp_path):
    root = write_tones(tmp_path / "sounds", bad=True)
    cfg = tiny_cfg(tmp_path, root, "x")
    with pytest.warns(UserWarning, match=r"skipped 4 of 21 .*2 unreadable.*1 empty.*1 silent"):
        ds = load_dataset(cfg.data)
    assert isinstance(ds, MelDataset) and ds.images.dtype == torch.uint8
    assert ds.images.shape == (17, 16, 16) and ds.channels == 1
    assert ds.class_names == ["tone1200", "tone300", "tone600"] and ds.labels.tolist().count(1) == 9
    # the stored uint8 log-mel reads back (x / 127.5 - 1) within one quantisation step of the float one
    exact = waveform_to_logmel(torch.from_numpy(loudness_normalise(tone(600.0))), mel_spec_of(cfg.data))
    stored = ds.images[ds.labels == 2][0].float() / 127.5 - 1
    assert (stored - exact.clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6
    # every odd file (8/24-bit, float, stereo 44.1 kHz, short) became a loud 1 s clip
    assert ds.seconds.min() == pytest.approx(0.3, abs=1e-3) and (ds.images.float().amax((1, 2)) > 180).all()
    cfg.data.num_classes = 0
    assert load_dataset(cfg.data).labels is None


# ---- training and resume ---------------------------------------------------------------------------


def test_training_resumes_bitwise_exactly(tones, tmp_path):
    from ditkit.train.loop import train

    quiet = lambda m: None  # noqa: E731
    straight = train(tiny_cfg(tmp_path, tones, "straight"), log=quiet)
    stopped = train(tiny_cfg(tmp_path, tones, "resumed"), stop_at_step=2, log=quiet)
    assert stopped.step == 2
    resumed = train(tiny_cfg(tmp_path, tones, "resumed"), resume=stopped.run_dir, log=quiet)
    assert resumed.step == straight.step == 5
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(straight.checkpoint / file)), load_file(str(resumed.checkpoint / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((straight.run_dir / "config.json").read_text())["data"]
    assert (saved["sample_rate"], saved["n_mels"], saved["hop_length"], saved["channels"]) == (SR, 16, 250, 1)
    assert saved["class_names"] == ["tone1200", "tone300", "tone600"]


def test_training_writes_spectrogram_strips_and_wavs(trained):
    samples = trained.run_dir / "samples"
    assert (samples / "step_0000005.png").is_file()
    wav, rate = sf.read(samples / "step_0000005_0.wav")
    assert rate == SR and wav.shape == (SR,)


# ---- sampling: ditkit.load and ditkit sample ---------------------------------------------------------


def test_load_returns_the_audio_pipeline_with_waveforms(trained):
    pipe = ditkit.load(trained.run_dir, device="cpu")
    assert isinstance(pipe, AudioPipeline)
    out = pipe(class_labels=["tone600", 0], duration=1.0, num_inference_steps=3)
    assert isinstance(out, AudioPipelineOutput)
    assert out.waveforms.shape == (2, SR) and out.waveforms.dtype == np.float32 and out.sample_rate == SR
    assert out.logmels.shape == (2, 16, 16) and out.labels == [2, 0]
    assert out.metadata["duration_seconds"] == "1" and json.loads(out.metadata["mel"])["n_mels"] == 16
    again = pipe(class_labels=[2], duration=1.0, num_inference_steps=3)  # sample 0 depends on its seed only
    assert np.array_equal(again.waveforms[0], out.waveforms[0])
    longer = pipe(class_labels=[1], duration=1.3, num_inference_steps=2)  # 20.8 frames -> 22 (whole patches)
    assert longer.waveforms.shape == (1, round(1.3 * SR)) and longer.logmels.shape[-1] == 22
    with pytest.raises(ConfigError, match="--duration 0"):
        pipe(class_labels=[1], duration=0.0)
    with pytest.raises(ConfigError, match="outside this checkpoint's classes"):
        pipe(class_labels=[5])


def test_sample_cli_writes_wav_and_png_per_clip(trained, tmp_path):
    out_dir = tmp_path / "seven"
    rc = main(["sample", "--ckpt", str(trained.run_dir), "--class-labels", "1", "--duration", "1.0",
               "--num-sampling-steps", "3", "--num-samples", "2", "--out-dir", str(out_dir), "--device", "cpu"])
    assert rc in (0, None)
    for i in range(2):
        wave, rate = sf.read(out_dir / f"{i:06d}.wav")
        assert rate == SR and wave.shape == (SR,) and np.isfinite(wave).all()
        assert (out_dir / f"{i:06d}.png").is_file()
    meta = json.loads((out_dir / "metadata.json").read_text())
    assert [s["label"] for s in meta["samples"]] == ["1", "1"] and meta["shared"]["sample_rate"] == str(SR)
    assert not list(out_dir.glob(".*"))  # nothing half written


def test_sample_cli_refuses_duration_for_image_checkpoints(tmp_path, capsys):
    from ditkit.train.loop import train

    cfg = get_recipe("shapes_tiny")
    cfg.run = RunConfig(results_dir=str(tmp_path), run_name="img", tensorboard=False)
    run = train(cfg, log=lambda m: None)
    rc = main(["sample", "--ckpt", str(run.run_dir), "--duration", "1.0", "--out-dir", str(tmp_path / "o")])
    assert rc != 0 and "--duration is for audio models" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_cli_scores_an_audio_run(trained, tmp_path, tones):
    out = tmp_path / "eval.json"
    rc = main(["eval", "--ckpt", str(trained.run_dir), "--num-samples", "12", "--num-sampling-steps", "2",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--device", "cpu"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["num_samples"] == 12 and "pocketsphinx_accuracy" not in report  # tones are not digit words
    assert 0.0 <= report["classifier_accuracy"] <= 1.0 and report["fd_classifier"] >= 0.0
    assert report["real_time_factor"] > 0 and report["sampling"]["num_sampling_steps"] == "2"
    assert report["reference"] == str(tones)


def test_serve_answers_wavs_on_v1_audio(trained, serve_session):
    import base64
    import io

    async def talk(client):
        listed = (await client.get("/v1/models")).json()["models"][0]
        ok = await client.post("/v1/audio", json={"model": "tones", "class_labels": ["tone300"], "num_samples": 2,
                                                   "duration": 0.5, "steps": 2})
        too_long = await client.post("/v1/audio", json={"model": "tones", "duration": 600.0})
        wrong_door = await client.post("/v1/images", json={"model": "tones"})
        return listed, ok, too_long, wrong_door

    listed, ok, too_long, wrong_door = serve_session([f"tones={trained.run_dir}"], talk)
    assert listed["modality"] == "audio" and listed["sample_rate"] == SR and listed["defaults"]["duration"] == 1.0
    assert ok.status_code == 200, ok.text
    clips = ok.json()["clips"]
    assert [c["label"] for c in clips] == [1, 1] and clips[0]["seconds"] == 0.5
    wave, rate = sf.read(io.BytesIO(base64.b64decode(clips[0]["wav_base64"])))
    assert rate == SR and wave.shape == (SR // 2,)
    assert too_long.status_code == 422 and "duration=600.0 is outside" in too_long.json()["detail"]
    assert wrong_door.status_code == 422 and "/v1/audio" in wrong_door.text


def test_a_tiny_model_learns_which_tone_each_class_is(tmp_path, tones):
    """300 steps on three tones: the guided samples of each class peak at that class's mel bin."""
    from ditkit.train.loop import train

    cfg = tiny_cfg(tmp_path, tones, "learn", max_steps=300, lr=3e-3, global_batch_size=12, log_every=100)
    cfg.model.hidden_size, cfg.model.num_heads = 64, 4
    run = train(cfg, log=lambda m: None)
    real = load_dataset(cfg.data)
    real_peak = {int(y): int(p) for y, p in zip(real.labels, real.images.float().mean(-1).argmax(-1))}
    out = ditkit.load(run.run_dir, device="cpu")(class_labels=[0, 1, 2] * 4, num_inference_steps=10, guidance_scale=3.0)
    peaks = out.logmels.mean(-1).argmax(-1).tolist()  # loudest mel bin of each clip
    hits = sum(abs(p - real_peak[y]) <= 1 for p, y in zip(peaks, out.labels))
    assert hits >= 9, (peaks, real_peak)


def test_builder_warns_when_a_token_is_wider_than_the_model(tones, tmp_path):
    cfg = tiny_cfg(tmp_path, tones, "x")
    cfg.data.num_classes, cfg.model.patch_size = 3, 4  # 4 frames x 16 bins = 64 numbers > width 32
    with pytest.warns(UserWarning, match="64 numbers, more than the width 32"):
        model_kwargs(cfg)
    cfg.model.patch_size = 2  # 32 numbers: fits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_kwargs(cfg)


def test_the_cli_trains_other_durations_than_the_square_spectrogram(tmp_path, tones):
    """``ditkit train --data sounds/ --duration 2.0`` (the issue's command): 2 s clips are 128 frames of
    64 mel bins, not data.image_size square; the checkpoint samples 2 s by default."""
    rc = main(["train", "--recipe", "spoken_digits", "--data", str(tones), "--duration", "2.0", "--max-steps", "2",
               "--global-batch-size", "4", "--results-dir", str(tmp_path), "--run-name", "two_s",
               "--set", "train.time_budget=none", "--set", "train.sample_every=0", "--set", "train.precision=fp32"])
    assert rc in (0, None)
    pipe = ditkit.load(tmp_path / "two_s", device="cpu")
    out = pipe(class_labels=[0], num_inference_steps=2)
    assert pipe.cfg.data.duration == 2.0 and out.logmels.shape == (1, 64, 128) and out.waveforms.shape == (1, 32000)
