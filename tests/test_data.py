"""Data: image folders (classes, flat, corrupt files), arrays, built-ins, the resumable sampler."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.config import DataConfig
from ditkit.data import (
    DataError,
    EpochBatchSampler,
    ImageDataset,
    load_array_file,
    load_dataset,
    load_digits,
    load_image_folder,
    make_shapes,
)


def _png(path, size=(12, 8), colour=(255, 0, 0), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)


def test_class_folders_give_sorted_labels_and_centre_crop(tmp_path):
    # 12x8 image: left 2 columns blue, the middle 8 green, right 2 blue -> the centre crop is all green
    for cls, n in (("cat", 2), ("ant", 3)):
        for i in range(n):
            im = Image.new("RGB", (12, 8), (0, 0, 255))
            im.paste((0, 255, 0), (2, 0, 10, 8))
            path = tmp_path / cls / f"{i}.png"
            path.parent.mkdir(exist_ok=True)
            im.save(path)
    ds = load_image_folder(tmp_path, image_size=8)
    assert ds.images.shape == (5, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.class_names == ["ant", "cat"] and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert (ds.images[:, 1] == 255).all() and (ds.images[:, 2] == 0).all()  # only the green middle


def test_flat_folder_is_unconditional_and_grayscale_detected(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", size=(16, 16), colour=(100 + i,), mode="L")
    ds = load_image_folder(tmp_path, image_size=8)
    assert ds.labels is None and ds.num_classes == 0 and ds.images.shape == (3, 1, 8, 8)
    assert ds.images[:, 0, 0, 0].tolist() == [100, 101, 102]
    rgb = load_image_folder(tmp_path, image_size=8, channels=3)
    assert rgb.images.shape == (3, 3, 8, 8)


def test_corrupt_files_are_skipped_with_one_warning(tmp_path):
    for i in range(2):
        _png(tmp_path / f"good{i}.png", size=(8, 8))
    for i in range(5):
        (tmp_path / f"bad{i}.png").write_bytes(b"not an image at all" * i)
    good = tmp_path / "good0.png"
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:40])
    (tmp_path / "notes.txt").write_text("not an image extension: ignored silently")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_image_folder(tmp_path, image_size=8)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "skipped 6 unreadable image file(s)" in messages[0]
    assert "bad0.png" in messages[0] and "and 3 more" in messages[0]
    assert len(ds) == 2


def test_folder_without_readable_images_fails_naming_the_path(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=f"none of the 1 image file.*{tmp_path}"):
            load_image_folder(tmp_path, image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"no image files under {empty}"):
        load_image_folder(empty, image_size=8)
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(DataConfig(dataset=str(tmp_path / "missing"), image_size=8))


def test_array_files_npz_with_labels_and_npy_float(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, size=(6, 10, 10, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", arr_0=nhwc, labels=np.array([0, 1, 2, 0, 1, 2]))
    ds = load_array_file(tmp_path / "d.npz", image_size=10)
    assert ds.images.shape == (6, 3, 10, 10) and ds.num_classes == 3
    assert torch.equal(ds.images, torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    floats = rng.random((4, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", floats)
    ds = load_array_file(tmp_path / "f.npy", image_size=4)
    assert ds.images.shape == (4, 1, 4, 4) and ds.labels is None
    np.savez(tmp_path / "bad.npz", weights=nhwc)
    with pytest.raises(DataError, match="store the images under 'images' or 'arr_0'"):
        load_array_file(tmp_path / "bad.npz", image_size=8)


def test_builtin_digits_and_shapes():
    digits = load_digits()
    assert digits.images.shape == (1797, 1, 8, 8) and digits.labels.max() == 9
    assert digits.images.max() == 255
    ds = load_dataset(DataConfig(dataset="digits", image_size=16))
    assert ds.images.shape == (1797, 1, 16, 16)
    a, b = make_shapes(64, 16, seed=0), make_shapes(64, 16, seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, make_shapes(64, 16, seed=1).images)
    assert set(a.labels.tolist()) == {0, 1, 2, 3}
    # the shape is bright and the background dark: the brightest pixel beats the corner by far
    assert (a.images.amax(dim=(1, 2, 3)).float() - a.images[:, :, 0, 0].float().amax(1) > 100).all()


def test_num_classes_option():
    assert load_dataset(DataConfig(dataset="shapes", image_size=8, num_items=16, num_classes=0)).labels is None
    ds = load_dataset(DataConfig(dataset="shapes", image_size=8, num_items=16, num_classes=6))
    assert ds.num_classes == 6
    with pytest.raises(DataError, match="smaller than the 4 classes"):
        load_dataset(DataConfig(dataset="shapes", image_size=8, num_items=16, num_classes=3))


def _indexed_dataset(n=10):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    images[:, :, :, 1] = 200  # right column differs so a flip is visible
    return ImageDataset(images, torch.arange(n) % 3, 3, ["a", "b", "c"], "test")


def _ids(x):
    return ((x[:, 0, 0, 0] + 1) * 127.5).round().long()  # left column pixel -> index (unflipped)


def test_sampler_epochs_cover_the_data_and_resume_exactly():
    ds = _indexed_dataset(10)
    s = EpochBatchSampler(ds, batch_size=3, seed=7)
    assert s.steps_per_epoch == 3
    epoch0 = torch.cat([_ids(s.next_batch()[0]) for _ in range(3)])
    assert len(set(epoch0.tolist())) == 9  # a permutation slice: no repeats, last partial batch dropped
    assert s.state_dict()["epoch"] == 1
    s.next_batch()
    state = s.state_dict()  # mid-epoch
    rest = [s.next_batch() for _ in range(4)]
    t = EpochBatchSampler(ds, batch_size=3, seed=7)
    t.load_state_dict(state)
    for x_ref, y_ref in rest:
        x, y = t.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    other = EpochBatchSampler(ds, batch_size=3, seed=8)
    assert not torch.equal(torch.cat([_ids(other.next_batch()[0]) for _ in range(3)]), epoch0)
    with pytest.raises(DataError, match="cannot resume the data order"):
        other.load_state_dict(state)


def test_sampler_flips_about_half_and_scales_to_minus_one_one():
    ds = _indexed_dataset(200)
    ds.images[:, :, :, 0] = 0
    s = EpochBatchSampler(ds, batch_size=200, seed=0, hflip=True)
    x, _ = s.next_batch()
    assert x.min() == -1.0 and x.max() == pytest.approx(200 / 127.5 - 1)
    flipped = (x[:, 0, 0, 0] > 0).float().mean()  # the bright column moved left
    assert 0.3 < flipped < 0.7
    with pytest.raises(DataError, match="lower --global-batch-size"):
        EpochBatchSampler(ds, batch_size=201)
