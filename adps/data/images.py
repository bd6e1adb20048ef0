"""Image files read as their owner sees them: the one decode path of every image and mask.

Training, validation, evaluation, ``adps predict`` (PyTorch and ONNX) and the served model all
read files through :func:`decode_image`, so they agree on which files are readable and on what
their pixels are. What a file says about itself is obeyed, or the file is refused with the reason:

- **orientation**: an EXIF (JPEG, PNG, WebP) or TIFF Orientation tag is applied, as every viewer does;
- **byte order**: big- and little-endian 16-bit samples read as the same values;
- **significant bits**: a 16-bit grayscale PNG whose ``sBIT`` chunk declares s < 16 bits and whose
  values all fit in s bits (a 12-bit camera's unscaled data) reads on the scale 0..2^s - 1;
- **palette**: expanded to its colours (a palette index is not a brightness);
- **colour profile**: an embedded ICC profile (Display P3 phone photos, Adobe RGB, CMYK) is
  converted to sRGB for images; masks are labels and keep their values;
- **transparency**: an image or mask with any pixel not fully opaque is refused (how it looks depends
  on the background it is shown on); a fully opaque alpha channel is dropped;
- **frames**: a file with several frames or pages (multi-page TIFF, animated GIF) is refused;
- **value range**: 8-bit 0..255, 16-bit 0..65535; 32-bit samples as 0..255 when they all fit, else as
  0..65535 (floats all in [0, 1] as 0..1); non-finite, negative or larger values are refused. A 16-bit
  colour PNG with few significant bits stored unscaled is refused (only its high byte can be read).

- **special files**: a named pipe, socket, device or folder is refused by its kind before it is opened
  (opening a FIFO waits for a writer: one such file must not hang a run).

Masks, one rule for every source (:func:`mask_defect`): with no threshold (``data.mask_threshold: null``) a
pixel is defect when its value is non-zero (any channel, after palette expansion), and validation requires
masks to be two-level; with a threshold t a pixel is defect when its value, on the 0..255 scale, is > t:
8-bit values as they are, 16-bit and float values scaled by 255 / their full scale (65535, the ``sBIT``
scale, or 1.0), a bilevel (mode ``1``) mask's 1 as 255.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageCms

from adps.errors import ImageReadError
from adps.files import path_text

Array = np.ndarray
Source = Path | str | IO[bytes]

MAX_IMAGE_PIXELS = 64_000_000  # larger files are refused before decoding (a decompression bomb costs GBs)
MIN_IMAGE_SIDE = 16  # smaller images carry no texture to score; resizing them up only invents pixels
BITS_PER_MODE = {  # every mode a file may decode to, with its bits per sample; byte order aside (I;16B is I;16)
    "1": 1,
    "L": 8,
    "P": 8,
    "LA": 8,
    "PA": 8,
    "RGB": 8,
    "RGBA": 8,
    "CMYK": 8,
    "YCbCr": 8,
    "I;16": 16,
    "I": 32,
    "F": 32,
}
FLATTEN = (
    "how the image looks depends on the background it is shown on; flatten it onto the background your "
    "camera sees and save it without alpha"
)
UNSIGNED_16 = ("I;16", "I;16B", "I;16L", "I;16N")
ORIENTATION_TAG = 0x0112
TRANSPOSE_FOR_ORIENTATION = {  # as Pillow's ImageOps.exif_transpose, applied after the samples are native
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, ImageCms.PyCMSError)


@dataclass(frozen=True)
class DecodedImage:
    """One file's pixels as its owner sees them, and what the file is.

    ``pixels``: upright, single frame, opaque, palette expanded; mode L, RGB, CMYK, YCbCr, I;16, I or F.
    ``mode``: the file's own mode (byte order aside); ``full_scale``: the sample value that is white.
    """

    pixels: Image.Image
    mode: str
    bit_depth: int
    full_scale: float
    icc_profile: bytes | None
    format: str = ""  # the file format as Pillow names it (PNG, JPEG, TIFF...)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as shown, after orientation."""
        return self.pixels.size


def decode_image(source: Source, name: str | None = None, what: str = "image") -> DecodedImage:
    """Decode a file (or its bytes) completely, as described in the module docstring.

    Raises:
        ImageReadError: missing, truncated, not an image, too large or small, several frames,
            transparent, or values that cannot be read; the message names the file and why.
    """
    try:
        if isinstance(source, Path | str):
            check_regular_file(source)
        with Image.open(source) as img:
            check_image_size(img.size)
            check_single_frame(img)
            img.load()
            mode = file_mode(img)
            orientation = img.getexif().get(ORIENTATION_TAG, 1)
            depth, bits = png_depth_and_bits(source) if img.format == "PNG" else (None, None)
            pixels = upright(opaque(expand_palette(native_byte_order(img))), orientation)
            check_high_byte_only(pixels, depth, bits)
            icc = img.info.get("icc_profile") or None
            bit_depth = 16 if depth == 16 else BITS_PER_MODE[mode]
            return DecodedImage(pixels, mode, bit_depth, full_scale(pixels, bits), icc, img.format or "")
    except Image.UnidentifiedImageError as err:
        raise ImageReadError(f"cannot read {what} {shown(source, name)}: not an image file of a known format") from err
    except READ_ERRORS as err:
        raise ImageReadError(f"cannot read {what} {shown(source, name)}: {path_text(str(err))}") from err


def shown(source: Source, name: str | None) -> str:
    """The file as messages name it: any name as text every writer takes (a latin-1 name as ``\\xe9``)."""
    return path_text(name if name is not None else source if isinstance(source, Path | str) else "<bytes>")


SPECIAL_KINDS = (  # stat test -> what the file is, in words
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def special_kind(path: Path | str) -> str | None:
    """What a path is when it is not a regular file (links followed), in words; None for a regular file
    or a path that does not exist (its reader says so). Read from ``stat``: the file is never opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in SPECIAL_KINDS if test(mode)), "not a regular file")


def check_regular_file(path: Path | str) -> None:
    """Refuse a special file by its kind before opening it: opening a named pipe blocks until a writer comes."""
    if kind := special_kind(path):
        raise ValueError(f"{kind}, not a regular file: not opened")


def check_image_size(size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{width}x{height} px is over the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; downscale it first"
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"{width}x{height} px is smaller than {MIN_IMAGE_SIDE} px on a side")


def check_single_frame(img: Image.Image) -> None:
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        raise ValueError(f"the file holds {frames} frames (pages); save the one to inspect as a file of its own")


def file_mode(img: Image.Image) -> str:
    """The file's mode with byte order aside (I;16B, I;16L and I;16N are all I;16); refused when unsupported."""
    mode = "I;16" if img.mode in UNSIGNED_16 else img.mode
    if mode not in BITS_PER_MODE:
        raise ValueError(f"image mode {img.mode} is not supported; save it as 8-bit RGB or grayscale")
    return mode


def native_byte_order(img: Image.Image) -> Image.Image:
    """16-bit samples of either byte order as native unsigned values (mode I;16)."""
    if img.mode in UNSIGNED_16 and img.mode != "I;16":
        return Image.fromarray(np.asarray(img).astype(np.uint16))
    return img


def upright(img: Image.Image, orientation: int) -> Image.Image:
    """A new image turned as the EXIF/TIFF orientation tag says (values outside 2..8 leave it as stored)."""
    method = TRANSPOSE_FOR_ORIENTATION.get(orientation)
    return img.transpose(method) if method is not None else img.copy()


def expand_palette(img: Image.Image) -> Image.Image:
    """Palette images as their colours (with alpha when the palette or a colour key has transparency).

    A colour key on 16-bit or 32-bit samples (PNG ``tRNS``) is refused when any pixel matches it.
    """
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode in ("L", "RGB") and "transparency" in img.info:  # a tRNS colour key
        return img.convert("LA" if img.mode == "L" else "RGBA")
    key = img.info.get("transparency")
    if img.mode in ("I;16", "I") and isinstance(key, int) and (keyed := int((np.asarray(img) == key).sum())):
        raise ValueError(f"{keyed} pixels are transparent (colour key {key}): {FLATTEN}")
    return img


def opaque(img: Image.Image) -> Image.Image:
    """The image without its alpha channel, refused when any pixel is not fully opaque."""
    if "A" not in img.getbands():
        return img
    see_through = int((np.asarray(img.getchannel("A")) < 255).sum())
    if see_through:
        raise ValueError(f"{see_through} pixels are transparent (alpha < 255): {FLATTEN}")
    return img.convert("RGB" if img.mode in ("RGBA", "RGBa") else "L")


def png_depth_and_bits(source: Source) -> tuple[int | None, int | None]:
    """A PNG's sample depth (IHDR) and the significant bits its ``sBIT`` chunk declares (largest over channels).

    Read from the chunks before the image data; (None, None) when they cannot be read.
    """
    depth = bits = None
    with contextlib.ExitStack() as stack:
        if isinstance(source, Path | str):
            stream = stack.enter_context(open(source, "rb"))
        else:
            stream = source
            stream.seek(0)
        stream.read(8)  # signature
        while len(header := stream.read(8)) == 8:
            length, kind = struct.unpack(">I4s", header)
            if kind in (b"IDAT", b"IEND"):
                break
            data = stream.read(length)
            stream.read(4)  # CRC
            if kind == b"IHDR" and len(data) >= 9:
                depth = data[8]
            elif kind == b"sBIT" and data:
                bits = max(data)
    return depth, bits if depth == 16 else None


def check_high_byte_only(img: Image.Image, depth: int | None, bits: int | None) -> None:
    """Refuse a 16-bit colour PNG whose few significant bits are stored unscaled.

    The reader gets 16-bit colour as its high byte, which is right for data scaled to 16 bits (the PNG
    rule) but all but black for, say, 12-bit camera values stored as they are.
    """
    if depth != 16 or not bits or bits >= 16 or img.mode != "RGB":
        return
    if int(np.asarray(img).max()) <= (2**bits - 1) >> 8:
        raise ValueError(
            f"16-bit colour with {bits} significant bits stored unscaled: only its high byte would be read (all "
            "but black); save it as 8-bit colour, as 16-bit grayscale, or scaled to 16 bits"
        )


def full_scale(img: Image.Image, declared_bits: int | None) -> float:
    """The sample value that means white, from the mode, the declared bits and (for floats) the values."""
    if img.mode not in ("I;16", "I", "F"):
        return 255.0
    values = np.asarray(img, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("the image has NaN or infinite pixel values")
    low, top = float(values.min()), float(values.max())
    if low < 0 or top > 65535:
        raise ValueError(f"pixel values span {low:g}..{top:g}: only 0..65535 (or float 0..1) can be read as brightness")
    if img.mode == "I;16" and declared_bits and declared_bits < 16 and top <= 2**declared_bits - 1:
        return float(2**declared_bits - 1)  # unscaled camera data (e.g. 12 significant bits in 16)
    if img.mode == "F" and top <= 1.0:
        return 1.0
    if img.mode in ("F", "I") and top <= 255.0:  # 32-bit samples holding 8-bit values
        return 255.0
    return 65535.0


def to_srgb(img: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """An 8-bit image converted from its embedded ICC profile to sRGB (RGB); others as RGB."""
    if icc_profile is None:
        return img.convert("RGB")
    if img.mode not in ("L", "RGB", "CMYK"):
        raise ValueError(f"it carries a colour profile for mode {img.mode}, which cannot be applied: remove it")
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")


def rgb_image(decoded: DecodedImage, name: str = "") -> Image.Image:
    """The decoded file as an 8-bit sRGB PIL image (16-bit and float samples scaled by their full scale)."""
    img = decoded.pixels
    try:
        if img.mode in ("I;16", "I", "F"):
            if decoded.icc_profile is not None:
                raise ValueError("it carries a colour profile on 16-bit or float samples, which cannot be applied")
            values = np.asarray(img, dtype=np.float64) * (255.0 / decoded.full_scale)
            return Image.fromarray(values.round().clip(0, 255).astype(np.uint8)).convert("RGB")
        return to_srgb(img, decoded.icc_profile)
    except READ_ERRORS as err:
        raise ImageReadError(f"cannot read image {name}: {err}") from err


@dataclass(frozen=True)
class InputGeometry:
    """How an image of any size becomes the model's input: the one rule of training, evaluation and serving.

    ``resize``: squeezed to ``size`` x ``size`` (the model's training input). ``native``: kept at its own
    size and shape, times ``scale``; the model crops it for training and covers it whole for prediction.
    ``auto``: native when the image is larger than ``size`` on either side (resizing would throw
    resolution away), resize otherwise.
    """

    size: int
    resolution: str = "resize"
    scale: float = 1.0

    def is_native(self, width: int, height: int) -> bool:
        if self.resolution == "auto":
            return width > self.size or height > self.size
        return self.resolution == "native"

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the model input for an image of ``width`` x ``height``."""
        if not self.is_native(width, height):
            return self.size, self.size
        return max(1, round(width * self.scale)), max(1, round(height * self.scale))


def as_geometry(size: int | InputGeometry) -> InputGeometry:
    return size if isinstance(size, InputGeometry) else InputGeometry(size)


def read_rgb(
    source: Source, size: int | InputGeometry | None, name: str | None = None
) -> tuple[Array, tuple[int, int]]:
    """An image file (or its bytes) as (H, W, 3) float32 RGB in [0, 1] at the model input size of ``size``
    (an :class:`InputGeometry`; an int resizes to a square; None keeps its own size), and its own (width, height).

    Raises:
        ImageReadError: see :func:`decode_image`.
    """
    decoded = decode_image(source, name)
    img = rgb_image(decoded, name or str(source))
    target = decoded.size if size is None else as_geometry(size).input_size(*decoded.size)
    if target != img.size:
        img = img.resize(target, Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0, decoded.size


def load_rgb(path: Source, size: int | InputGeometry | None, name: str | None = None) -> Array:
    """Read an image as (H, W, 3) float32 RGB in [0, 1] at the model input size; see :func:`read_rgb`."""
    return read_rgb(path, size, name)[0]


def mask_values(decoded: DecodedImage) -> Array:
    """A decoded mask's values (H, W): the largest channel of each pixel (0 = normal)."""
    values = np.asarray(decoded.pixels)
    return values.max(axis=2) if values.ndim == 3 else values


def mask_levels(decoded: DecodedImage) -> Array:
    """A decoded mask's values (H, W) on the 0..255 scale: 8-bit as they are, 16-bit and float samples
    scaled by 255 / their full scale, a bilevel (mode ``1``) mask's 1 as 255."""
    values = mask_values(decoded).astype(np.float64)
    if decoded.pixels.mode == "1":
        return values * 255.0
    return values * (255.0 / decoded.full_scale)


def mask_defect(decoded: DecodedImage, threshold: float | None = None) -> Array:
    """The one mask rule: (H, W) booleans, True = defect.

    ``threshold`` None: any non-zero value (masks are then required to be two-level); a number t:
    a value > t on the 0..255 scale of :func:`mask_levels` (``data.mask_threshold``) for a mask of more
    than two values. A two-level mask (0 and one other value) means what it says whatever t is: a mask
    of 0 and 1, common from labelling scripts, marks its 1s, where a threshold would read it as empty.
    """
    values = mask_values(decoded)
    if threshold is None or two_level(values):
        return values > 0
    return mask_levels(decoded) > threshold


def two_level(values: Array) -> bool:
    """Whether mask values are 0 and one other value (or all 0): a mask of one value other than 0 is not, so a
    threshold decides whether it marks the whole image (all 255) or nothing (a noise floor of 90)."""
    levels = np.unique(values)
    return levels.tolist() == [0] or (len(levels) == 2 and levels[0] == 0)


def describe_mask_values(decoded: DecodedImage) -> str:
    """What a mask file holds, for messages: ``a PNG with 37 distinct values in 0..255 (8-bit)``."""
    values = np.unique(mask_values(decoded)).astype(np.float64)
    kind = decoded.format or "file"
    article = "an" if kind[0].upper() in "AEIOU" else "a"
    spread = f"{values[0]:g}..{values[-1]:g}"
    return f"{article} {kind} with {len(values)} distinct values in {spread} ({decoded.bit_depth}-bit)"


def read_mask(path: Path, threshold: float | None = None) -> Array:
    """A mask file as booleans at its own size, by :func:`mask_defect`'s rule."""
    return mask_defect(decode_image(path, what="mask"), threshold)


def load_mask(path: Path | None, size: int | tuple[int, int] | None) -> Array:
    """A mask as (H, W) float32 in {0, 1}: at its own stored size when ``size`` is None, else nearest-resized
    to ``size`` (a side, or (width, height)); zeros of ``size`` when ``path`` is None."""
    shape = (size, size) if isinstance(size, int) else size
    if path is None:
        return np.zeros(shape[::-1], np.float32)
    defect = Image.fromarray(np.where(read_mask(path), 255, 0).astype(np.uint8), mode="L")
    if shape is not None and tuple(shape) != defect.size:
        defect = defect.resize(tuple(shape), Image.NEAREST)
    return (np.asarray(defect) > 0).astype(np.float32)
