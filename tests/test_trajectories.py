"""Sampling trajectories for text and audio (``--trajectory [--trajectory-points N]``, as images):
text shows the partly unmasked tokens at N steps (trajectory.txt), audio the predicted and noisy
spectrograms (trajectory.png); recording changes nothing that is drawn."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ditkit
from ditkit.cli import main
from ditkit.config import ConfigError
from ditkit.pipelines.text import TokenTrajectory
from ditkit.recipes import get_recipe
from ditkit.samplers.block import block_diffusion

TEXT_CKPT = Path(__file__).parent / "fixtures" / "outputs" / "text_ckpt"  # masked TextDiT, seq_len 24, char tokenizer


@pytest.fixture(scope="module")
def masked():
    return ditkit.load(TEXT_CKPT, device="cpu")


def _train(root, name, recipe, **sets):
    from ditkit.train.loop import train

    cfg = get_recipe(recipe)
    cfg.run.results_dir, cfg.run.run_name = str(root), name
    cfg.train.max_steps, cfg.train.ckpt_every, cfg.train.log_every = 1, 1, 1
    cfg.data.synthetic_docs = 200
    for key, value in sets.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    return train(cfg, log=lambda line: None).run_dir


# ---- text ----------------------------------------------------------------------------------------


def test_masked_text_trajectory_reveals_tokens_and_ends_at_the_output(masked):
    mask_id = masked.tokenizer.mask_id
    out = masked(num_samples=3, num_inference_steps=12, seed=5, trajectory_points=5)
    assert out.trajectory_steps == [0, 3, 6, 8, 11]  # evenly spread, the last step included
    assert out.metadata["trajectory_steps"] == "0 3 6 8 11"
    tokens = out.trajectory_tokens  # (N, K, L)
    assert tokens.shape == (3, 5, out.tokens.shape[1])
    masks = (tokens[:, :, out.start:] == mask_id).sum(-1)  # (N, K) masked positions per row
    length = out.tokens.shape[1] - out.start
    assert (masks[:, 0] >= length // 2).all(), masks  # after 1 of 12 steps most tokens are still masked
    assert (masks[:, 1:] <= masks[:, :-1]).all(), masks  # MDLM never remasks: monotone non-increasing
    assert (masks[:, -1] == 0).all() and torch.equal(tokens[:, -1], out.tokens)
    mask_text = masked.tokenizer.mask_text
    for rows, text in zip(out.trajectory, out.texts):
        assert len(rows) == 5 and rows[-1] == text
        assert rows[0].count(mask_text) >= length // 2
    # prompt tokens are fixed from the first row on
    prompted = masked("12+", num_inference_steps=6, seed=1, trajectory_points=3)
    assert all(row.startswith("12+") for row in prompted.trajectory[0])


def test_semi_autoregressive_trajectory_covers_every_window(masked):
    mask_id, seq_len = masked.tokenizer.mask_id, masked.cfg.data.seq_len
    out = masked(num_tokens=2 * seq_len, stride=seq_len // 2, num_inference_steps=4, seed=2, trajectory_points=6)
    assert len(out.trajectory_steps) == 6 and out.trajectory_steps[-1] == 3 * 4 - 1  # 3 windows x 4 steps
    done = (out.trajectory_tokens != mask_id).sum(-1)[0]
    assert (done[1:] >= done[:-1]).all() and done[0] < seq_len and int(done[-1]) == out.tokens.shape[1]
    assert torch.equal(out.trajectory_tokens[:, -1], out.tokens) and out.trajectory[0][-1] == out.texts[0]
    assert torch.equal(masked(num_tokens=2 * seq_len, stride=seq_len // 2, num_inference_steps=4, seed=2).tokens, out.tokens)


def test_recording_changes_nothing_drawn(masked):
    plain = masked(num_samples=2, num_inference_steps=8, seed=3)
    traced = masked(num_samples=2, num_inference_steps=8, seed=3, trajectory_points=4)
    assert plain.trajectory is None and plain.trajectory_tokens is None
    assert torch.equal(plain.tokens, traced.tokens) and plain.texts == traced.texts
    assert "trajectory_steps" not in plain.metadata


def test_trajectory_file_and_refusals(masked, tmp_path):
    out = masked(num_samples=2, num_inference_steps=6, seed=0, trajectory_points=3)
    written = out.save(tmp_path)
    assert tmp_path / "trajectory.txt" in written
    lines = (tmp_path / "trajectory.txt").read_text(encoding="utf-8").splitlines()
    body = [line for line in lines if line.startswith("step ")]
    assert len(body) == 2 * 3
    assert body[2] == "step 6 | " + out.texts[0].replace("\\", "\\\\").replace("\n", "\\n")
    assert sum(line.startswith("==== sample") for line in lines) == 2
    with pytest.raises(ConfigError, match="--trajectory-points -1"):
        masked(trajectory_points=-1)


def test_token_trajectory_pads_growing_rows_with_the_mask():
    record = TokenTrajectory(points=3, mask_id=9)
    record.plan(5)  # steps 0, 2, 4
    for step in range(4):  # a run that stopped after 4 of 5 steps (block diffusion at a stop token)
        record.record(step, torch.arange(step + 2).unsqueeze(0))
    rows = record.finish(torch.arange(5).unsqueeze(0))
    assert record.steps == [0, 2, 3]
    assert rows.tolist() == [[[0, 1, 9, 9, 9], [0, 1, 2, 3, 9], [0, 1, 2, 3, 4]]]


def test_block_sampler_step_callback_sees_every_step_across_blocks():
    vocab, mask_id = 5, 5

    class Uniform:  # a denoiser that ignores its context: every token equally likely
        def commit(self, tokens):
            pass

        def denoise(self, z, t):
            logp = torch.full((*z.shape, vocab + 1), -np.log(vocab))
            logp[..., mask_id] = -float("inf")
            return logp

    seen = []
    out = block_diffusion(Uniform(), torch.zeros(2, 0, dtype=torch.long), 6, block_size=4, num_steps=3, mask_id=mask_id,
                          generator=torch.Generator().manual_seed(0),
                          step_callback=lambda k, tokens: seen.append((k, tokens.clone())))
    assert [k for k, _ in seen] == list(range(6))  # 2 blocks (4 + 2 tokens) x 3 steps
    assert [t.shape[1] for _, t in seen] == [4, 4, 4, 6, 6, 6]
    assert torch.equal(seen[-1][1], out) and not (out == mask_id).any()
    assert torch.equal(seen[3][1][:, :4], out[:, :4])  # the first block is finished when the second starts
    again = block_diffusion(Uniform(), torch.zeros(2, 0, dtype=torch.long), 6, block_size=4, num_steps=3,
                            mask_id=mask_id, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, out)  # the callback changes nothing drawn


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("traj_text")
    return {"ar": _train(root, "ar", "text_sums", objective__kind="autoregressive"),
            "block": _train(root, "block", "text_sums_bd3")}


def test_autoregressive_and_block_trajectories_grow_to_the_output(text_runs):
    for kind, run in text_runs.items():
        pipe = ditkit.load(run, device="cpu")
        mask_id = pipe.tokenizer.mask_id
        out = pipe("1+", num_samples=2, num_inference_steps=4, num_tokens=12, seed=0, trajectory_points=4)
        tokens = out.trajectory_tokens
        done = (tokens != mask_id).sum(-1)  # (N, K) generated or given tokens per row
        assert (done[:, 1:] >= done[:, :-1]).all() and (done[:, 0] < done[:, -1]).all(), (kind, done)
        assert torch.equal(tokens[:, -1], out.tokens) and [r[-1] for r in out.trajectory] == out.texts, kind
        plain = pipe("1+", num_samples=2, num_inference_steps=4, num_tokens=12, seed=0)
        assert torch.equal(plain.tokens, out.tokens), kind


# ---- audio ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    sf = pytest.importorskip("soundfile")
    pytest.importorskip("librosa")
    from ditkit.config import Config, DataConfig, ModelConfig, ObjectiveConfig, RunConfig, SampleConfig, TrainConfig
    from ditkit.train.loop import train

    root = tmp_path_factory.mktemp("traj_audio")
    sr = 4000  # 1 s = 16 frames of hop 250, 16 mel bins
    t = np.arange(sr) / sr
    for freq in (300.0, 900.0):
        folder = root / "tones" / f"tone{int(freq)}"
        folder.mkdir(parents=True)
        for k in range(2):
            sf.write(folder / f"{k}.wav", (0.3 * np.sin(2 * np.pi * freq * (1 + 0.01 * k) * t)).astype(np.float32), sr)
    cfg = Config(
        model=ModelConfig(name="AudioDiT-T/2", hidden_size=32, depth=2, num_heads=2, class_dropout_prob=0.1),
        objective=ObjectiveConfig(kind="gaussian", schedule="cosine", learn_sigma=False),
        data=DataConfig(dataset=str(root / "tones"), image_size=16, sample_rate=sr, n_mels=16, n_fft=256, hop_length=250),
        train=TrainConfig(global_batch_size=4, max_steps=1, log_every=1, ckpt_every=1, precision="fp32", device="cpu",
                          sample_every=0),
        run=RunConfig(results_dir=str(root / "runs"), run_name="tones", tensorboard=False),
        sample=SampleConfig(num_sampling_steps=5, cfg_scale=1.0, num_samples=2),
    )
    return train(cfg, log=lambda line: None).run_dir


def test_audio_trajectory_png_has_two_rows_of_k_spectrograms_per_sample(audio_run, tmp_path):
    pipe = ditkit.load(audio_run, device="cpu")
    kw = dict(class_labels=[0, 1], num_inference_steps=5, seed=2, griffin_lim_iters=2)
    out = pipe(**kw, trajectory_points=3)
    n_mels, frames = out.logmels.shape[1:]
    assert out.trajectory_steps == [0, 2, 4] and out.trajectory.shape == (2, 3, n_mels, frames)
    assert out.trajectory_xt.shape == out.trajectory.shape
    assert not torch.equal(out.trajectory[:, 0], out.trajectory_xt[:, 0])  # x0 prediction vs noisy state
    written = out.save(tmp_path)
    assert tmp_path / "trajectory.png" in written
    picture = Image.open(tmp_path / "trajectory.png")
    scale, pad = 2, 2
    assert picture.size == (3 * frames * scale + 2 * pad, 4 * n_mels * scale + 3 * pad)
    assert picture.text["trajectory_steps"] == "0 2 4"
    plain = pipe(**kw)
    assert plain.trajectory is None and torch.equal(plain.logmels, out.logmels)
    assert np.array_equal(plain.waveforms, out.waveforms)
    assert not (tmp_path / "plain").exists() and "trajectory.png" not in [p.name for p in plain.save(tmp_path / "plain")]


# ---- the command line ----------------------------------------------------------------------------


def test_cli_trajectory_flag_reaches_text_and_audio(audio_run, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(TEXT_CKPT), "--num-samples", "2", "--num-sampling-steps", "6", "--trajectory",
                 "--trajectory-points", "3", "--out-dir", str(tmp_path / "text")]) == 0
    lines = (tmp_path / "text" / "trajectory.txt").read_text(encoding="utf-8").splitlines()
    assert sum(line.startswith("step ") for line in lines) == 2 * 3
    meta = json.loads((tmp_path / "text" / "samples.jsonl").read_text().splitlines()[0])["metadata"]
    assert meta["trajectory_steps"] == "0 2 5"
    assert main(["sample", "--ckpt", str(audio_run), "--num-samples", "1", "--num-sampling-steps", "4",
                 "--griffin-lim-iters", "2", "--trajectory", "--out-dir", str(tmp_path / "audio")]) == 0
    picture = Image.open(tmp_path / "audio" / "trajectory.png")
    assert picture.text["trajectory_steps"] == "0 1 2 3"  # default 8 points, capped at the 4 steps
    assert main(["sample", "--ckpt", str(TEXT_CKPT), "--num-samples", "1", "--num-sampling-steps", "4",
                 "--out-dir", str(tmp_path / "off")]) == 0
    assert not (tmp_path / "off" / "trajectory.txt").exists()
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(TEXT_CKPT), "--trajectory-points", "3", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "--trajectory-points 3: give a count >= 1, together with --trajectory" in capsys.readouterr().err
