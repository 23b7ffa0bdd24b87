"""Audio data: mel settings, waveform <-> log-mel, WAV subtypes, audio folders, spoken digits."""

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile")
librosa = pytest.importorskip("librosa")

from ditkit.data import audio  # noqa: E402
from ditkit.data.audio import (  # noqa: E402
    MelSpec,
    fit_duration,
    load_audio_folder,
    load_real_digits,
    load_spoken_digits,
    logmel_to_waveform,
    loudness_normalise,
    read_audio,
    spectrogram_pixels,
    waveform_to_logmel,
    write_wav,
)
from ditkit.errors import ConfigError  # noqa: E402

SR = 16000
HAVE_TTS = shutil.which("flite") is not None and shutil.which("espeak-ng") is not None


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_melspec_round_trips_as_a_plain_dict():
    spec = MelSpec(n_mels=40, fmax=7000.0, norm_high=2.0)
    data = json.loads(json.dumps(spec.to_dict()))
    assert MelSpec.from_dict(data) == spec
    assert spec.num_frames(1.0) == 64 and spec.frames_per_second == 64.0
    with pytest.raises(ConfigError, match="unknown mel setting"):
        MelSpec.from_dict({**data, "hop": 3})
    with pytest.raises(ConfigError, match="fmax"):
        MelSpec(fmax=9000.0)


def test_logmel_of_a_tone_peaks_at_its_mel_bin_and_matches_librosa():
    spec = MelSpec()
    wave = tone(1000.0, 1.0)
    mel = waveform_to_logmel(wave, spec)
    assert mel.shape == (64, 64) and mel.dtype == torch.float32
    centres = librosa.mel_frequencies(n_mels=spec.n_mels + 2, fmin=0.0, fmax=SR / 2)[1:-1]
    assert abs(centres[int(mel[:, 32].argmax())] - 1000.0) < 80.0
    ref = librosa.feature.melspectrogram(y=wave, sr=SR, n_fft=1024, hop_length=250, n_mels=64, power=1.0)[:, :64]
    ref = 2 * (np.log(np.maximum(ref, spec.log_floor)) - spec.norm_low) / (spec.norm_high - spec.norm_low) - 1
    np.testing.assert_allclose(mel.numpy(), ref, atol=1e-3)
    assert mel.max() <= 1.2
    silent = waveform_to_logmel(np.zeros(SR, np.float32), spec)
    assert torch.all(silent == -1.0)  # padding and silence are exactly -1
    batch = waveform_to_logmel(torch.stack([torch.from_numpy(wave), torch.zeros(SR)]), spec)
    torch.testing.assert_close(batch[0], mel)


def test_griffin_lim_recovers_the_tone_and_the_spectrogram():
    spec = MelSpec()
    mel = waveform_to_logmel(tone(440.0, 0.5), spec)
    wave = logmel_to_waveform(mel, spec, n_iter=16)
    assert wave.shape == (mel.shape[-1] * spec.hop_length,) and wave.dtype == np.float32
    power = np.abs(np.fft.rfft(wave)) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1 / SR)
    assert power[(freqs > 350) & (freqs < 550)].sum() > 0.9 * power.sum()  # mel bins near 440 Hz are ~60 Hz wide
    assert (waveform_to_logmel(wave, spec) - mel).abs().mean() < 0.15
    assert np.all(logmel_to_waveform(torch.full((64, 8), -1.0), spec, n_iter=2) == 0)  # silence stays silent
    with pytest.raises(ConfigError, match="mel bins"):
        logmel_to_waveform(torch.zeros(10, 8), spec)


def test_spectrogram_pixels_put_low_frequencies_at_the_bottom():
    mel = torch.full((4, 3), -1.0)
    mel[0] = 1.0  # lowest mel bin loud
    pixels = spectrogram_pixels(mel)
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 3)
    assert np.all(pixels[-1] == 255) and np.all(pixels[:-1] == 0)


def test_write_wav_is_pcm16_and_leaves_nothing_half_written(tmp_path):
    wave = tone(300.0, 0.1)
    path = write_wav(tmp_path / "a" / "x.wav", wave, SR)
    info = sf.info(str(path))
    assert info.subtype == "PCM_16" and info.samplerate == SR and info.channels == 1
    np.testing.assert_allclose(sf.read(str(path), dtype="float32")[0], wave, atol=1 / 16000)
    with pytest.raises(ConfigError, match="mono"):
        write_wav(tmp_path / "b.wav", np.zeros((2, 10)), SR)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["x.wav"]


@pytest.mark.parametrize(
    "fmt,subtype", [("WAV", "PCM_U8"), ("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"),
                    ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")]
)
def test_read_audio_handles_subtypes_channels_and_rates(tmp_path, fmt, subtype):
    left, right = tone(500.0, 0.5, sr=8000, amp=0.6), tone(500.0, 0.5, sr=8000, amp=0.2)
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(str(path), np.stack([left, right], axis=1), 8000, subtype=subtype, format=fmt)
    wave = read_audio(path, SR)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - SR // 2) <= 1200  # resampled 8 kHz -> 16 kHz (mp3 adds encoder delay)
    lossy = fmt in ("OGG", "MP3")
    assert abs(np.abs(wave).max() - 0.4) < (0.1 if lossy else 0.02)  # mean of the two channels
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * SR / len(wave) - 500.0) < 10.0


def test_fit_duration_and_loudness():
    padded, content = fit_duration(np.ones(100, np.float32), 160)
    assert content == 100 and padded.shape == (160,) and np.all(padded[100:] == 0)
    cut, content = fit_duration(np.ones(300, np.float32), 200, fade_samples=50)
    assert content == 200 and cut[0] == 1 and cut[-1] == 0  # faded, no click
    quiet = loudness_normalise(tone(200.0, 0.5, amp=0.01))
    assert abs(20 * np.log10(np.sqrt(np.mean(quiet.astype(np.float64) ** 2))) + 20.0) < 0.5
    spiky = np.zeros(8000, np.float32)
    spiky[100] = 0.5
    assert np.abs(loudness_normalise(spiky)).max() <= 0.99 + 1e-6  # the peak limit wins


def _write_folder(root):
    (root / "low").mkdir(parents=True)
    (root / "high").mkdir()
    sf.write(str(root / "low" / "a.wav"), tone(200.0, 0.5, amp=0.05), SR, subtype="PCM_16")
    sf.write(str(root / "low" / "b.flac"), tone(220.0, 2.0, sr=22050), 22050)
    sf.write(str(root / "high" / "c.wav"), np.stack([tone(2000.0, 0.3)] * 3, 1), SR, subtype="PCM_24")
    sf.write(str(root / "high" / "silent.wav"), np.zeros(SR, np.float32), SR)
    sf.write(str(root / "high" / "empty.wav"), np.zeros(0, np.float32), SR)
    (root / "high" / "broken.wav").write_bytes(b"RIFF not really a wave file")


def test_audio_folder_classes_durations_and_one_summary_of_skips(tmp_path):
    _write_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_audio_folder(tmp_path, SR, duration=1.0)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "skipped 3 of 6" in messages[0]
    for part in ("1 unreadable (high/broken.wav)", "1 empty (high/empty.wav)", "1 silent (high/silent.wav)"):
        assert part in messages[0]
    assert ds.class_names == ["high", "low"] and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 1, 1]  # high/c.wav, low/a.wav, low/b.flac
    assert ds.waves.shape == (3, SR) and ds.waves.dtype == torch.float32
    torch.testing.assert_close(ds.seconds, torch.tensor([0.3, 0.5, 1.0]))
    active = ds.waves[1, : SR // 2].double()
    assert abs(20 * math.log10(float(active.pow(2).mean().sqrt())) + 20.0) < 0.5  # -20 dBFS
    assert torch.all(ds.waves[1, SR // 2 :] == 0)  # zero-padded at the end
    assert ds.logmels(MelSpec()).shape == (3, 64, 64)


def test_audio_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_audio_folder(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no audio files"):
        load_audio_folder(tmp_path)
    sf.write(str(tmp_path / "quiet.wav"), np.zeros(100, np.float32), SR)
    with pytest.raises(ConfigError, match="none of the 1"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_audio_folder(tmp_path)
    sf.write(str(tmp_path / "ok.wav"), tone(300.0, 0.2), SR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat = load_audio_folder(tmp_path, SR, duration=0.25)
    assert flat.labels is None and flat.num_classes == 0 and flat.waves.shape == (1, 4000)


def test_spoken_digits_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(audio.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="apt-get install flite espeak-ng"):
        load_spoken_digits(cache=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ConfigError, match="unknown spoken_digits voice"):
        load_spoken_digits(cache=tmp_path, voices=["flite:hal9000"])


@pytest.mark.skipif(not HAVE_TTS, reason="needs flite and espeak-ng (apt-get install flite espeak-ng)")
def test_spoken_digits_generated_once_then_read_from_the_cache(tmp_path, monkeypatch):
    kw = dict(cache=tmp_path, voices=["flite:slt", "espeak:en-us"], pitches=(1.0,), rates=(1.0,))
    ds = load_spoken_digits(**kw)
    assert len(ds) == 20 and ds.waves.shape == (20, SR) and ds.sample_rate == SR
    assert sorted(ds.labels.tolist()) == sorted(list(range(10)) * 2)
    assert ds.speaker_names == ["flite:slt", "espeak:en-us"] and set(ds.speakers.tolist()) == {0, 1}
    assert torch.all((ds.seconds > 0.15) & (ds.seconds < 1.0))
    for i in range(20):  # speech starts at once (flite's own files open with 160-250 ms of near silence)
        n = int(round(float(ds.seconds[i]) * SR))
        assert ds.waves[i, :800].abs().max() > 0.005 * ds.waves[i].abs().max()
        assert torch.all(ds.waves[i, n:] == 0)  # padding follows the content

    def no_synthesis(*args, **kwargs):
        raise AssertionError("the synthesiser ran again although the clips are cached")

    monkeypatch.setattr(audio.subprocess, "run", no_synthesis)
    again = load_spoken_digits(**kw)
    torch.testing.assert_close(again.waves, ds.waves)
    assert (load_spoken_digits(**kw, duration=0.5)).waves.shape == (20, SR // 2)


def test_real_digits_when_installed(tmp_path):
    with pytest.raises(ConfigError, match="apt-get install asterisk-core-sounds-en-wav"):
        load_real_digits(folder=tmp_path)
    if not (audio.REAL_DIGITS_DIR / "0.wav").exists():
        pytest.skip("asterisk-core-sounds-en-wav not installed")
    ds = load_real_digits()
    assert ds.waves.shape == (10, SR) and ds.labels.tolist() == list(range(10))
