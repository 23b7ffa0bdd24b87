"""ditkit.fileio: whole files or none, and the writers that go through it."""

import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.fileio import atomic_path, write_bytes, write_text
from ditkit.media import save_png


def _siblings(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_renames_on_success_keeps_the_suffix_and_makes_the_folder(tmp_path):
    target = tmp_path / "new" / "grid.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png" and tmp.name.startswith(".")
        assert not target.exists()  # nothing under the final name while writing
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    assert _siblings(target.parent) == ["grid.png"]


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text(tmp_path / "metadata.json", "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert _siblings(tmp_path) == ["metadata.json"]


def test_write_bytes_with_fsync_and_write_text_utf8(tmp_path):
    assert write_bytes(tmp_path / "a.bin", b"\x00\x01", fsync=True).read_bytes() == b"\x00\x01"
    assert write_text(tmp_path / "b.txt", "héllo").read_bytes() == "héllo".encode("utf-8")


def test_two_threads_writing_one_path_never_share_a_temporary(tmp_path):
    target, seen, barrier = tmp_path / "x.txt", [], threading.Barrier(2, timeout=30)

    def writer(text):
        with atomic_path(target) as tmp:
            seen.append(tmp)
            barrier.wait()  # both temporaries exist at once
            tmp.write_text(text)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("aaaa", "bbbb")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen[0] != seen[1] and target.read_text() in ("aaaa", "bbbb")
    assert _siblings(tmp_path) == ["x.txt"]


def test_save_png_is_atomic_for_paths_and_still_takes_file_objects(tmp_path, monkeypatch):
    import io

    pixels = np.full((4, 4, 3), 200, np.uint8)
    path = tmp_path / "000000.png"
    save_png(pixels, path, {"seed": "0"})
    assert Image.open(path).text["seed"] == "0"
    buffer = io.BytesIO()
    save_png(pixels, buffer)
    assert buffer.getvalue().startswith(b"\x89PNG")

    def broken_save(self, fp, *args, **kwargs):  # the encoder fails half way through the file
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_png(np.zeros((4, 4, 3), np.uint8), path)
    monkeypatch.undo()
    assert Image.open(path).getpixel((0, 0)) == (200, 200, 200)  # the earlier file, whole
    assert _siblings(tmp_path) == ["000000.png"]


def test_npz_samples_keep_numpy_naming_and_write_whole(tmp_path):
    from ditkit.eval.images import save_npz_samples

    images = torch.zeros(2, 3, 4, 4)
    save_npz_samples(tmp_path / "samples", images, torch.tensor([1, 2]))  # np.savez adds .npz
    data = np.load(tmp_path / "samples.npz")
    assert data["arr_0"].shape == (2, 4, 4, 3) and data["arr_1"].tolist() == [1, 2]
    assert _siblings(tmp_path) == ["samples.npz"]


def test_npz_samples_failing_half_way_leave_the_earlier_file(tmp_path, monkeypatch):
    from ditkit.eval import images as image_io

    image_io.save_npz_samples(tmp_path / "samples.npz", torch.zeros(1, 3, 4, 4))

    def broken_savez(file, *arrays):
        with open(file, "wb") as f:
            f.write(b"PK half")
        raise OSError("No space left on device")

    monkeypatch.setattr(image_io.np, "savez", broken_savez)
    with pytest.raises(OSError, match="No space"):
        image_io.save_npz_samples(tmp_path / "samples.npz", torch.ones(5, 3, 4, 4))
    monkeypatch.undo()
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (1, 4, 4, 3)
    assert _siblings(tmp_path) == ["samples.npz"]


def test_a_checkpoint_side_file_survives_a_failed_rewrite(tmp_path, monkeypatch):
    from ditkit.train.checkpoint import atomic_write_bytes

    path = tmp_path / "config.json"
    atomic_write_bytes(path, b"{}")
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_bytes(path, b'{"new": 1}')
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == b"{}" and _siblings(tmp_path) == ["config.json"]
