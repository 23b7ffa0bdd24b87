"""Audio judges: pocketsphinx digit recognition, the log-mel classifier and its Frechet distance,
duration measurement, the report."""

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("librosa")

from ditkit.data.audio import MelSpec, load_spoken_digits, waveform_to_logmel  # noqa: E402
from ditkit.errors import ConfigError  # noqa: E402
from ditkit.eval import audio as audio_eval  # noqa: E402
from ditkit.eval.audio import (  # noqa: E402
    MelClassifierConfig,
    _augment,
    audible_seconds,
    audio_report,
    duration_error,
    fd_classifier,
    get_mel_classifier,
)

SR = 16000


def tones(freqs, n_per, seconds=0.5, seed=0, jitter=30.0):
    """Clips (n, SR * seconds) of noisy tones around each frequency, labels = frequency index."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    waves, labels = [], []
    for k, f in enumerate(freqs):
        for _ in range(n_per):
            f0 = f + rng.uniform(-jitter, jitter)
            length = rng.uniform(0.2, seconds)
            w = 0.3 * np.sin(2 * np.pi * f0 * t + rng.uniform(0, 6.28)) * (t < length) + 0.003 * rng.standard_normal(len(t))
            waves.append(w.astype(np.float32))
            labels.append(k)
    return torch.from_numpy(np.stack(waves)), torch.tensor(labels)


FAST = MelClassifierConfig(width=16, feature_dim=16, epochs=20, batch_size=16, max_shift=2, mel_shift=0, lowpass=False)


def test_classifier_learns_held_out_groups_and_is_cached(tmp_path, monkeypatch):
    spec = MelSpec(n_mels=32)
    waves, labels = tones([300.0, 1200.0, 3000.0], 24)
    mels = waveform_to_logmel(waves, spec)
    groups = torch.arange(len(labels)) % 6
    clf = get_mel_classifier(mels, labels, tmp_path, FAST, groups=groups)
    assert clf.info["holdout_accuracy"] >= 0.9 and clf.info["holdout"] == "whole groups"
    feats, logits = clf.features_and_logits(mels)
    assert feats.shape == (72, 16) and logits.shape == (72, 3)

    def no_training(*a, **k):
        raise AssertionError("trained again although cached")

    monkeypatch.setattr(audio_eval, "train_mel_classifier", no_training)
    again = get_mel_classifier(mels, labels, tmp_path, FAST, groups=groups)
    assert again.hash == clf.hash
    torch.testing.assert_close(again.features_and_logits(mels)[0], feats)
    with pytest.raises(ConfigError, match="wants"):
        clf.features_and_logits(torch.zeros(2, 10, 8))


def test_holdout_split_keeps_groups_whole():
    groups = torch.arange(60) % 10
    train, held = audio_eval._holdout_split(60, MelClassifierConfig(holdout_fraction=0.2), groups, torch.Generator().manual_seed(0))
    assert len(set(groups[held].tolist())) == 2
    assert not set(groups[held].tolist()) & set(groups[train].tolist())
    assert len(train) + len(held) == 60


def test_frechet_distance_small_for_same_distribution_large_for_another():
    spec = MelSpec(n_mels=32)
    waves, labels = tones([300.0, 1200.0, 3000.0], 30)
    mels = waveform_to_logmel(waves, spec)
    clf = get_mel_classifier(mels, labels, None, FAST)
    same = waveform_to_logmel(tones([300.0, 1200.0, 3000.0], 30, seed=1)[0], spec)
    other = waveform_to_logmel(tones([600.0, 5000.0, 7000.0], 30, seed=1)[0], spec)
    assert fd_classifier(clf, mels, same) * 3 < fd_classifier(clf, mels, other)


def test_augment_keeps_silence_and_shape():
    x = torch.full((4, 32, 16), -1.0)
    x[:, 5:10, :8] = 0.5
    out = _augment(x, MelClassifierConfig(max_shift=3, mel_shift=2), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.all(out[:, 20:, :] == -1.0)  # bins far from the content stay silent
    assert torch.all(out[:, :, 11:] == -1.0)  # delayed by at most 3 frames


def test_audible_seconds_and_duration_error():
    t = np.arange(SR) / SR
    waves = np.stack([0.3 * np.sin(2 * np.pi * 500 * t) * (t < 0.4), np.zeros(SR)]).astype(np.float32)
    got = audible_seconds(waves, SR)
    assert abs(got[0] - 0.4) < 0.03 and got[1] == 0.0
    assert duration_error(waves, [0.4, 0.0], SR) < 0.02
    assert abs(duration_error(waves, [0.9, 0.5], SR) - 0.5) < 0.03


HAVE_FLITE = shutil.which("flite") is not None


@pytest.mark.skipif(not HAVE_FLITE, reason="needs flite (apt-get install flite)")
def test_pocketsphinx_hears_flite_digits(tmp_path):
    pytest.importorskip("pocketsphinx")
    ds = load_spoken_digits(cache=tmp_path, voices=["flite:kal16"], pitches=(1.0,), rates=(1.0,))
    recogniser = audio_eval.DigitRecognizer()
    heard = recogniser.recognise(ds.waves, SR)
    assert np.mean(np.array(heard) == ds.labels.numpy()) >= 0.9
    assert audio_eval.spoken_digit_accuracy(ds.waves, ds.labels, SR, recogniser) >= 0.9
    import librosa

    at_8k = librosa.resample(ds.waves.numpy(), orig_sr=SR, target_sr=8000, axis=-1)
    assert audio_eval.spoken_digit_accuracy(at_8k, ds.labels, 8000, recogniser) >= 0.8  # resampled inside
    shuffled = (ds.labels + 1) % 10
    assert audio_eval.spoken_digit_accuracy(ds.waves, shuffled, SR, recogniser) <= 0.2
    with pytest.raises(ConfigError, match="labels"):
        audio_eval.spoken_digit_accuracy(ds.waves, ds.labels[:3], SR, recogniser)


def test_report_without_pocketsphinx():
    spec = MelSpec(n_mels=32)
    waves, labels = tones([300.0, 1200.0, 3000.0], 20)
    mels = waveform_to_logmel(waves, spec)
    clf = get_mel_classifier(mels, labels, None, FAST)
    report = audio_report(waves[:12], labels[:12], spec, classifier=clf, real_logmels=mels,
                          target_seconds=audible_seconds(waves[:12], SR), use_pocketsphinx=False)
    assert set(report) == {"num_samples", "classifier_accuracy", "fd_classifier", "fd_real_floor", "duration_error_seconds"}
    assert report["num_samples"] == 12 and report["classifier_accuracy"] >= 0.8
    assert report["duration_error_seconds"] < 1e-9
