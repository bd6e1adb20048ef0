"""The one image reader: what a file says about itself is obeyed, or the file is refused with the reason.

Every expected value is worked out by hand from the pixels written; files are real (PIL writes them).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from adps.config import ImageMode
from adps.data.images import BITS_PER_MODE, decode_image, load_mask, read_rgb
from adps.data.validation import read_image_facts, read_mask_facts
from adps.errors import ImageReadError

ORIENTATION = 0x0112


def upright_image() -> Image.Image:
    """64 wide, 32 high: black left half, white right half, a grey top-left quarter (no symmetry)."""
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, 32:] = 255
    pixels[:16, :32] = 128
    return Image.fromarray(pixels)


def stored_sideways(path: Path, fmt: str, **save: object) -> None:
    """The upright image stored turned a quarter left, with orientation 6 ("turn right to view")."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    upright_image().transpose(Image.Transpose.ROTATE_90).save(path, fmt, exif=exif, **save)


def test_exif_orientation_is_applied_as_every_viewer_does(tmp_path):
    stored_sideways(tmp_path / "phone.png", "PNG")
    decoded = decode_image(tmp_path / "phone.png")
    assert decoded.size == (64, 32)  # stored 32 x 64
    assert np.array_equal(np.asarray(decoded.pixels), np.asarray(upright_image()))
    stored_sideways(tmp_path / "phone.jpg", "JPEG", quality=95)
    rgb, original = read_rgb(tmp_path / "phone.jpg", 64)
    expected, _ = read_rgb(io.BytesIO(png_bytes(upright_image())), 64)
    assert original == (64, 32) and np.abs(rgb - expected).mean() < 0.02  # JPEG noise only
    tiff = tmp_path / "line_scan.tif"
    upright_image().transpose(Image.Transpose.ROTATE_90).save(tiff, tiffinfo={ORIENTATION: 6})
    assert np.array_equal(np.asarray(decode_image(tiff).pixels), np.asarray(upright_image()))


def png_bytes(img: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG", **save)
    return buffer.getvalue()


def test_sixteen_bit_samples_read_the_same_in_either_byte_order(tmp_path):
    values = np.full((32, 32), 50000, np.uint16)
    Image.frombytes("I;16B", (32, 32), values.astype(">u2").tobytes()).save(tmp_path / "big.tif")
    Image.fromarray(values).save(tmp_path / "little.tif")
    assert Image.open(tmp_path / "big.tif").mode == "I;16B"
    big, little = read_rgb(tmp_path / "big.tif", 32)[0], read_rgb(tmp_path / "little.tif", 32)[0]
    assert np.array_equal(big, little) and big[0, 0, 0] == pytest.approx(195 / 255)  # 50000 / 257 = 194.55
    facts = read_image_facts(tmp_path / "big.tif")
    assert facts["decodes"] and facts["mode"] == "I;16" and facts["bit_depth"] == 16


def test_significant_bits_of_a_sixteen_bit_png_set_its_white(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([12]))
    twelve_bit = np.full((32, 32), 2048, np.uint16)
    twelve_bit[0, 0] = 4095
    Image.fromarray(twelve_bit).save(tmp_path / "camera.png", pnginfo=info)
    rgb = read_rgb(tmp_path / "camera.png", 32)[0]
    assert rgb[0, 0, 0] == 1.0 and rgb[5, 5, 0] == pytest.approx(128 / 255)  # 2048 / 4095 * 255 = 127.5 -> 128
    scaled = np.full((32, 32), 40000, np.uint16)  # above 12 bits: scaled to 16 bits as the PNG spec says
    Image.fromarray(scaled).save(tmp_path / "scaled.png", pnginfo=info)
    assert read_rgb(tmp_path / "scaled.png", 32)[0][0, 0, 0] == pytest.approx(156 / 255)  # 40000 / 257 = 155.6


def test_a_palette_is_read_as_its_colours(tmp_path):
    img = Image.fromarray(np.ones((32, 32), np.uint8), mode="P")
    img.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    img.save(tmp_path / "palette.png")
    assert (read_rgb(tmp_path / "palette.png", 32)[0][0, 0] * 255).round().tolist() == [200, 10, 20]


def test_transparency_is_refused_and_an_opaque_alpha_is_dropped(tmp_path):
    rgba = np.full((32, 32, 4), 255, np.uint8)
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert read_rgb(tmp_path / "opaque.png", 32)[0].min() == 1.0
    rgba[3, 4, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "hole.png")
    with pytest.raises(ImageReadError, match=r"hole.png: 1 pixels are transparent .*save it without alpha"):
        read_rgb(tmp_path / "hole.png", 32)
    keyed = Image.fromarray(np.zeros((32, 32), np.uint8), mode="P")
    keyed.putpalette([0, 0, 0] * 256)
    keyed.save(tmp_path / "keyed.png", transparency=0)  # a palette entry marked transparent
    with pytest.raises(ImageReadError, match="1024 pixels are transparent"):
        read_rgb(tmp_path / "keyed.png", 32)
    facts = read_image_facts(tmp_path / "hole.png")
    assert not facts["decodes"] and "transparent" in facts["decode_error"]


def test_several_frames_are_refused(tmp_path):
    pages = [Image.new("L", (32, 32), v) for v in (10, 200)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(ImageReadError, match="holds 2 frames"):
        read_rgb(tmp_path / "pages.tif", 32)


def swapped_primaries_profile() -> bytes:
    """An RGB ICC profile whose red and blue primaries are sRGB's blue and red (sRGB's tag table, two rows swapped)."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = int.from_bytes(icc[128:132], "big")
    rows = {bytes(icc[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, blue = rows[b"rXYZ"], rows[b"bXYZ"]
    icc[red + 4 : red + 12], icc[blue + 4 : blue + 12] = icc[blue + 4 : blue + 12], icc[red + 4 : red + 12]
    return bytes(icc)


def test_an_embedded_colour_profile_is_converted_to_srgb(tmp_path):
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    red.save(tmp_path / "srgb.png", icc_profile=srgb)
    assert np.abs(read_rgb(tmp_path / "srgb.png", 32)[0][0, 0] * 255 - [255, 0, 0]).max() <= 1  # unchanged
    red.save(tmp_path / "swapped.png", icc_profile=swapped_primaries_profile())  # its (255, 0, 0) is sRGB blue
    assert np.abs(read_rgb(tmp_path / "swapped.png", 32)[0][0, 0] * 255 - [0, 0, 255]).max() <= 1
    xyz = ImageCms.ImageCmsProfile(ImageCms.createProfile("XYZ")).tobytes()
    red.save(tmp_path / "xyz.png", icc_profile=xyz)  # a profile that cannot describe RGB samples
    with pytest.raises(ImageReadError, match="xyz.png: cannot build transform"):
        read_rgb(tmp_path / "xyz.png", 32)
    assert not read_image_facts(tmp_path / "xyz.png")["decodes"]


def test_values_that_cannot_be_brightness_are_refused(tmp_path):
    Image.fromarray(np.full((32, 32), -1.0, np.float32), mode="F").save(tmp_path / "negative.tif")
    with pytest.raises(ImageReadError, match=r"pixel values span -1..-1"):
        read_rgb(tmp_path / "negative.tif", 32)
    Image.fromarray(np.full((32, 32), 70000, np.int32), mode="I").save(tmp_path / "wide.tif")
    with pytest.raises(ImageReadError, match="only 0..65535"):
        read_rgb(tmp_path / "wide.tif", 32)


def odd_files(folder: Path) -> list[Path]:
    """One file of each odd kind (readable or not)."""
    stored_sideways(folder / "sideways.jpg", "JPEG")
    Image.frombytes("I;16B", (32, 32), np.full((32, 32), 9, ">u2").tobytes()).save(folder / "big.tif")
    Image.fromarray(np.zeros((32, 32), bool)).save(folder / "bits.png")
    Image.fromarray(np.zeros((32, 32), np.uint8), mode="P").save(folder / "palette.png")
    Image.fromarray(np.full((32, 32, 4), 255, np.uint8)).save(folder / "opaque.png")
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(folder / "clear.png")
    Image.new("CMYK", (32, 32)).save(folder / "print.jpg")
    Image.fromarray(np.full((32, 32), 0.5, np.float32), mode="F").save(folder / "float.tif")
    pages = [Image.new("L", (32, 32)), Image.new("L", (32, 32), 9)]
    pages[0].save(folder / "pages.tif", save_all=True, append_images=pages[1:])
    whole = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), np.uint8)))
    (folder / "half.png").write_bytes(whole[: len(whole) // 2])
    return sorted(folder.iterdir())


def test_validation_and_prediction_agree_on_which_files_are_readable(tmp_path):
    for path in odd_files(tmp_path):
        try:
            read_rgb(path, 32)
            readable = True
        except ImageReadError:
            readable = False
        facts = read_image_facts(path)
        assert facts["decodes"] == readable, (path.name, facts)
        if readable:
            assert facts["mode"] in BITS_PER_MODE and facts["bit_depth"] == BITS_PER_MODE[facts["mode"]]
    assert {p.name for p in tmp_path.iterdir() if not read_image_facts(p)["decodes"]} == {
        "clear.png",
        "pages.tif",
        "half.png",
    }


def test_the_modes_params_may_name_are_the_modes_the_reader_takes():
    assert set(get_args(ImageMode)) == set(BITS_PER_MODE)


def test_masks_are_read_by_the_same_rules(tmp_path):
    """A sideways mask turns with its image; a 16-bit 0/1 mask and a palette mask mark what they show."""
    mask = np.zeros((32, 64), np.uint8)
    mask[:, 40:] = 255
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(mask).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "m.png", exif=exif)
    assert load_mask(tmp_path / "m.png", 32)[:, 20:].all() and not load_mask(tmp_path / "m.png", 32)[:, :20].any()
    facts = read_mask_facts(tmp_path / "m.png", (64, 32), True)
    assert facts["mask_size_matches"] and facts["mask_binary"] and facts["mask_nonempty"]
    deep = np.zeros((32, 32), np.uint16)
    deep[:8] = 1
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert load_mask(tmp_path / "deep.png", 32).sum() == 8 * 32
    palette = Image.fromarray((np.arange(32 * 32).reshape(32, 32) < 64).astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 1 is pure blue (luminance 29)
    palette.save(tmp_path / "blue.png")
    assert load_mask(tmp_path / "blue.png", 32).sum() == 64


def test_more_value_rules_read_as_the_owner_means(tmp_path):
    """16-bit colour with 12 unscaled bits is refused; a 16-bit colour key is transparency; 32-bit 0..255 is 8-bit."""
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([12, 12, 12]))
    rgb16 = np.full((32, 32, 3), 2048, ">u2")  # 12-bit camera values, stored as they are
    write_png16_rgb(tmp_path / "camera.png", rgb16, sbit=12)
    with pytest.raises(ImageReadError, match="16-bit colour with 12 significant bits stored unscaled"):
        read_rgb(tmp_path / "camera.png", 32)
    write_png16_rgb(tmp_path / "scaled.png", np.full((32, 32, 3), 40000, ">u2"), sbit=12)
    assert read_rgb(tmp_path / "scaled.png", 32)[0][0, 0, 0] == pytest.approx(156 / 255)  # high byte of 40000
    assert read_image_facts(tmp_path / "scaled.png")["bit_depth"] == 16
    Image.fromarray(np.full((32, 32), 700, np.uint16)).save(tmp_path / "keyed16.png", transparency=700)
    with pytest.raises(ImageReadError, match="1024 pixels are transparent"):
        read_rgb(tmp_path / "keyed16.png", 32)
    Image.fromarray(np.full((32, 32), 200, np.int32), mode="I").save(tmp_path / "eight_in_32.tif")
    assert read_rgb(tmp_path / "eight_in_32.tif", 32)[0][0, 0, 0] == pytest.approx(200 / 255)


def write_png16_rgb(path: Path, pixels: np.ndarray, sbit: int) -> None:
    """A 16-bit RGB PNG with an sBIT chunk, written chunk by chunk (PIL cannot write 16-bit colour)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"sBIT", bytes([sbit] * 3))
    path.write_bytes(png + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
