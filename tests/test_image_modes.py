"""Every Pillow mode and bit depth, and every array dtype, is scaled from its true range (issue 14.2).

Known values: a 16-bit mid-grey 32768 must load as 128 (0.0 in [-1, 1]), not 255; a 16-level ramp
k * (full scale / 15) must load as k * 17 for k = 0..15. Lossy conversions warn once, counted.
"""

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.data import to_model_range
from ditkit.data.images import DataError, image_to_array, load_array_file, load_image_folder
from ditkit.errors import ConfigError

RAMP_8BIT = np.arange(16) * 17  # what a 16-level ramp over any full scale must load as


def _ramp(full_scale: float, dtype) -> np.ndarray:
    """(16, 16) image whose column k holds k * full_scale / 15."""
    return np.tile(np.arange(16) * (full_scale / 15), (16, 1)).astype(dtype)


def _load_one(tmp_path, save, image_size=16):
    """Save one image with ``save(path_stem)``, load the folder, return (images (N, C, H, W), warnings)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    save(tmp_path / "img")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_image_folder(tmp_path, image_size=image_size)
    return ds.images, [str(w.message) for w in caught]


def _png16(path, pixels: np.ndarray, color_type: int) -> None:
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit RGB/RGBA): pixels (H, W, C) uint16."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ---- 16-bit gray ---------------------------------------------------------------------------------


def test_issue_input_16bit_gray_png_mid_grey(tmp_path):
    images, caught = _load_one(tmp_path, lambda p: Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(f"{p}.png"), 8)
    assert images.shape == (1, 1, 8, 8) and (images == 128).all() and not caught  # was 255 (clipped)
    assert abs(to_model_range(images).mean().item()) < 0.01


def test_16bit_gray_png_ramp(tmp_path):
    images, _ = _load_one(tmp_path, lambda p: Image.fromarray(_ramp(65535, np.uint16)).save(f"{p}.png"))
    assert images[0, 0, 0].tolist() == RAMP_8BIT.tolist()  # was two levels, mostly white


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2")])
def test_16bit_gray_modes_in_memory(mode, dtype):
    im = Image.frombytes(mode, (16, 16), _ramp(65535, dtype).tobytes())
    pixels, gray, alpha = image_to_array(im, 16)
    assert gray and not alpha and pixels[0].tolist() == RAMP_8BIT.tolist()
    mid = Image.frombytes(mode, (4, 4), np.full((4, 4), 32768, dtype).tobytes())
    assert (image_to_array(mid, 4)[0] == 128).all()


def test_16bit_big_endian_tiff(tmp_path):
    def save(p):
        Image.frombytes("I;16B", (16, 16), _ramp(65535, ">u2").tobytes()).save(f"{p}.tif")

    images, _ = _load_one(tmp_path, save)
    assert images[0, 0, 5].tolist() == RAMP_8BIT.tolist()


def test_16bit_pgm_opened_as_I(tmp_path):
    # Pillow opens a 16-bit PGM as mode I (samples rescaled to 0..65535)
    body = np.full((4, 4), 32768, ">u2").tobytes()
    (tmp_path / "a.pgm").write_bytes(b"P5\n4 4\n65535\n" + body)
    with Image.open(tmp_path / "a.pgm") as im:
        assert im.mode == "I"
    assert (load_image_folder(tmp_path, 4).images == 128).all()


def test_16bit_gray_resized_in_float(tmp_path):
    # 32x32 of 32768 shrunk to 8x8: still 128 everywhere (no clipping, no 8-bit round-trip first)
    images, _ = _load_one(tmp_path, lambda p: Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(f"{p}.png"), 8)
    assert (images == 128).all()


# ---- 16-bit RGB(A) PNG ---------------------------------------------------------------------------


def test_16bit_rgb_png(tmp_path):
    pixels = np.zeros((16, 16, 3), np.uint16)
    pixels[..., 0] = _ramp(65535, np.uint16)
    pixels[..., 1] = 32768
    pixels[..., 2] = 65535
    _png16(tmp_path / "rgb16.png", pixels, color_type=2)
    images = load_image_folder(tmp_path, 16).images
    assert images.shape == (1, 3, 16, 16)
    assert images[0, 0, 0].tolist() == RAMP_8BIT.tolist() and (images[0, 1] == 128).all() and (images[0, 2] == 255).all()


def test_16bit_rgba_png_alpha_counted(tmp_path):
    opaque = np.full((4, 4, 4), 65535, np.uint16)
    opaque[..., :3] = 32768
    _png16(tmp_path / "a.png", opaque, color_type=6)
    see_through = opaque.copy()
    see_through[0, 0, 3] = 0
    _png16(tmp_path / "b.png", see_through, color_type=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = load_image_folder(tmp_path, 4).images
    assert (images == 128).all()
    assert len(caught) == 1 and "alpha channel of 1 image(s)" in str(caught[0].message)  # the opaque one is lossless


# ---- 32-bit integer and float --------------------------------------------------------------------


def test_32bit_integer_tiff(tmp_path):
    top = 2**31 - 1
    images, _ = _load_one(tmp_path / "ramp", lambda p: Image.fromarray(_ramp(top, np.int32)).save(f"{p}.tif"))
    assert images[0, 0, 0].tolist() == RAMP_8BIT.tolist()
    images, _ = _load_one(tmp_path / "mid", lambda p: Image.fromarray(np.full((4, 4), 2**30, np.int32)).save(f"{p}.tif"), 4)
    assert (images == 128).all()
    negative = tmp_path / "neg"
    negative.mkdir()
    Image.fromarray(np.full((4, 4), -5, np.int32)).save(negative / "n.tif")
    with pytest.raises(DataError, match="negative values"):
        load_image_folder(negative, 4)


@pytest.mark.parametrize("low", [0.0, -1.0])
def test_float_tiff_ramp_in_0_1_and_minus1_1(tmp_path, low):
    ramp = (low + _ramp(1.0, np.float64) * (1.0 - low)).astype(np.float32)
    images, _ = _load_one(tmp_path, lambda p: Image.fromarray(ramp).save(f"{p}.tif"))
    assert images[0, 0, 0].tolist() == RAMP_8BIT.tolist()


def test_float_tiff_out_of_range_is_an_error(tmp_path):
    Image.fromarray(np.full((4, 4), 300.0, np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(DataError, match=r"span \[300, 300\], neither \[0, 1\] nor \[-1, 1\]") as err:
        load_image_folder(tmp_path, 4)
    assert "\n" not in str(err.value) and "hdr.tif" in str(err.value)


# ---- 8-bit modes: palette, LA, RGBA, CMYK, 1-bit -------------------------------------------------


def test_palette_image_and_its_transparency(tmp_path):
    rgb = Image.new("RGB", (4, 4), (10, 128, 250))
    rgb.quantize(4).save(tmp_path / "p.png")
    images, caught = _load_one(tmp_path / "none", lambda p: rgb.quantize(4).save(f"{p}.png"), 4)
    assert images.shape == (1, 3, 4, 4) and images[0, :, 0, 0].tolist() == [10, 128, 250] and not caught
    pal = rgb.quantize(4)
    pal.info["transparency"] = 0  # palette entry 0 (the only colour) is transparent
    images, caught = _load_one(tmp_path / "t", lambda p: pal.save(f"{p}.png", transparency=0), 4)
    assert images[0, :, 0, 0].tolist() == [10, 128, 250] and len(caught) == 1 and "alpha" in caught[0]


def test_la_rgba_alpha_dropped_once_with_count(tmp_path):
    for i in range(3):
        Image.new("RGBA", (4, 4), (200, 100, 50, 128)).save(tmp_path / f"half{i}.png")
    Image.new("RGBA", (4, 4), (200, 100, 50, 255)).save(tmp_path / "opaque.png")
    Image.new("LA", (4, 4), (128, 0)).save(tmp_path / "la.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_image_folder(tmp_path, 4)
    assert ds.images.shape == (5, 3, 4, 4)
    # files sorted: half0..2, la, opaque; colours kept with the alpha dropped, LA gray expanded to RGB
    assert ds.images[:, :, 0, 0].tolist() == [[200, 100, 50]] * 3 + [[128, 128, 128], [200, 100, 50]]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "alpha channel of 4 image(s)" in messages[0], messages


def test_la_alone_stays_gray(tmp_path):
    images, _ = _load_one(tmp_path, lambda p: Image.new("LA", (4, 4), (128, 255)).save(f"{p}.png"), 4)
    assert images.shape == (1, 1, 4, 4) and (images == 128).all()


def test_cmyk_ramp_and_one_bit(tmp_path):
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[..., 3] = 255 - _ramp(255, np.uint8)  # ink K = 255 - level: Pillow's CMYK -> RGB gives level
    images, _ = _load_one(tmp_path / "cmyk", lambda p: Image.fromarray(cmyk, "CMYK").save(f"{p}.tif"))
    assert images.shape == (1, 3, 16, 16) and images[0, :, 0].tolist() == [RAMP_8BIT.tolist()] * 3
    bits = Image.new("1", (4, 4), 0)
    bits.putpixel((0, 0), 1)
    images, _ = _load_one(tmp_path / "bits", lambda p: bits.save(f"{p}.png"), 4)
    assert images.shape == (1, 1, 4, 4) and images[0, 0, 0, 0] == 255 and images.sum() == 255


def test_palette_and_gray_8bit_ramps(tmp_path):
    gray = Image.fromarray(_ramp(255, np.uint8))
    images, _ = _load_one(tmp_path / "l", lambda p: gray.save(f"{p}.png"))
    assert images.shape == (1, 1, 16, 16) and images[0, 0, 3].tolist() == RAMP_8BIT.tolist()
    palette = gray.convert("RGB").quantize(16)
    images, _ = _load_one(tmp_path / "p", lambda p: palette.save(f"{p}.png"))
    assert images.shape == (1, 3, 16, 16) and images[0, :, 3].tolist() == [RAMP_8BIT.tolist()] * 3


def test_16bit_gray_alpha_png(tmp_path):
    pixels = np.stack([np.full((4, 4), 32768, np.uint16), np.full((4, 4), 65535, np.uint16)], -1)
    _png16(tmp_path / "la16.png", pixels, color_type=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = load_image_folder(tmp_path, 4).images
    # Pillow opens 16-bit gray+alpha PNGs as 8-bit RGBA (gray replicated); opaque alpha: no warning
    assert images.shape == (1, 3, 4, 4) and (images == 128).all() and not caught


# ---- upscaling -----------------------------------------------------------------------------------


def test_upscaling_more_than_4x_warned_once_with_count(tmp_path):
    for i in range(2):
        Image.new("L", (1, 1), 77).save(tmp_path / f"tiny{i}.png")
    Image.new("L", (4, 4), 77).save(tmp_path / "four.png")  # exactly 4x: not warned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = load_image_folder(tmp_path, 16).images
    assert (images == 77).all()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "enlarged 2 image(s) more than 4x (smallest 1x1 -> 16x16)" in messages[0], messages


# ---- arrays --------------------------------------------------------------------------------------


def _load_array(tmp_path, array, image_size=16, **kwargs):
    np.save(tmp_path / "a.npy", array)
    return load_array_file(tmp_path / "a.npy", image_size, **kwargs).images


def test_array_uint8_and_uint16(tmp_path):
    ramp8 = np.tile(RAMP_8BIT, (2, 16, 1)).astype(np.uint8)
    assert torch.equal(_load_array(tmp_path, ramp8)[:, 0], torch.from_numpy(ramp8))
    ramp16 = np.stack([_ramp(65535, np.uint16)] * 2)
    assert _load_array(tmp_path, ramp16)[0, 0, 0].tolist() == RAMP_8BIT.tolist()
    assert (_load_array(tmp_path, np.full((1, 4, 4), 32768, np.uint16), 4) == 128).all()  # was 255


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_array_floats_detected(tmp_path, dtype):
    unit = np.stack([_ramp(1.0, np.float64)]).astype(dtype)
    assert _load_array(tmp_path, unit)[0, 0, 0].tolist() == RAMP_8BIT.tolist()
    signed = (unit.astype(np.float64) * 2 - 1).astype(dtype)
    assert _load_array(tmp_path, signed)[0, 0, 0].tolist() == RAMP_8BIT.tolist()


def test_array_range_declared(tmp_path):
    halves = np.full((1, 4, 4), 0.0, np.float32)  # 0.0 is black in [0, 1] and mid-grey in [-1, 1]
    assert (_load_array(tmp_path, halves, 4) == 0).all()
    assert (_load_array(tmp_path, halves, 4, array_range="-1,1") == 128).all()
    assert (_load_array(tmp_path, halves, 4, array_range="0,1") == 0).all()
    with pytest.raises(DataError, match=r"outside data.array_range 0,1"):
        _load_array(tmp_path, halves - 0.5, 4, array_range="0,1")
    with pytest.raises(ConfigError, match="data.array_range '0,255'"):
        _load_array(tmp_path, halves, 4, array_range="0,255")


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros((1, 4, 4), np.int64), "array dtype int64 is not an image type: .*uint8.*uint16.*data.array_range"),
        (np.zeros((1, 4, 4), np.int32), "array dtype int32"),
        (np.zeros((1, 4, 4), bool), "array dtype bool"),
        (np.full((1, 4, 4), 255.0, np.float32), r"span \[255, 255\], neither \[0, 1\] nor \[-1, 1\]"),
        (np.full((1, 4, 4), np.nan, np.float32), "NaN"),
    ],
)
def test_array_other_dtypes_and_ranges_are_one_line_errors(tmp_path, array, message):
    with pytest.raises(DataError, match=message) as err:
        _load_array(tmp_path, array, 4)
    assert "\n" not in str(err.value) and "a.npy" in str(err.value)


def test_array_alpha_and_upscale_warned(tmp_path):
    rgba = np.full((3, 2, 2, 4), 200, np.uint8)
    rgba[0, ..., 3] = 255  # one opaque image: dropping its alpha loses nothing
    np.savez(tmp_path / "d.npz", images=rgba)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = load_array_file(tmp_path / "d.npz", 16).images
    assert images.shape == (3, 3, 16, 16) and (images == 200).all()
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2, messages
    assert "alpha channel of 2 image(s)" in messages[0] and "enlarged 3 image(s) more than 4x (smallest 2x2" in messages[1]
