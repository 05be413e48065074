"""Single images for the resize cache: any mode to 8-bit RGB, turned upright by its EXIF
orientation (as viewers and phones show it), the short side resized and the
centre square cropped without ever making the whole resized image (``decode_resized``).
Every image the tool reads (the resize caches of VOC, ImageNet and ImageFolder, which ``figures``
reads too, and ``predict``'s files) is opened here: only regular files, and images of more than
``MAX_IMAGE_PIXELS`` are refused from the header, before anything is decoded."""

from __future__ import annotations

import math
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from data.core import DataError
from utils import short_reason

#: 50 megapixels. Twice ImageNet's largest photos (about 25 megapixels; VOC's are at most 500 x
#: 500), and every phone's and most cameras' full-resolution photos (a 50-megapixel sensor's 8160
#: x 6120 pass). Decoding costs about 8 bytes a pixel at the peak (Pillow holds RGB in 4 bytes, and
#: the conversion to RGB and the crop each copy it): 381 MB for a 49-megapixel PNG, measured, per
#: resize worker, within the 500 MB the tool allows a bad input beyond an ordinary one. 200
#: megapixels (a phone's largest mode, 16320 x 12240) would cost 1.6 GB per worker, and were refused
#: all the same by Pillow's own limit of 179; such a photo is one downscale away
#: (``magick in.jpg -resize 50000000@ out.jpg``).
MAX_IMAGE_PIXELS = 50_000_000


def _too_large(path: Path, size: str) -> DataError:
    return DataError(
        f"{path} claims to be {size} pixels, more than {MAX_IMAGE_PIXELS // 1_000_000} megapixels (a decompression "
        "bomb, a damaged header, or a photo to downscale first); replace it with a smaller image or remove it."
    )


def _check_header(image: Image.Image, path: Path) -> None:
    width, height = image.size  # from the header; nothing decoded yet
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(path, f"{width}x{height}")


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, refused unless it is a regular file (after links). A
    FIFO named ``photo.jpg`` would block ``open`` until something writes to it, and a device
    would stream forever: the file is opened without blocking and checked before it is read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise DataError(f"{path} is {kind}, not a regular file; replace it with an image file or remove it.")
    return fd


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side ``size``; int() truncates as torchvision's resize does
    (never below ``size``, which float rounding could give for a square)."""
    scale = size / min(width, height)
    return (size, max(size, int(height * scale))) if width <= height else (max(size, int(width * scale)), size)


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """``image`` as 8-bit RGB, whatever its mode.

    ``convert("RGB")`` is right for 8-bit modes (greyscale, palette, CMYK, YCbCr) but clips
    16-bit greyscale (``I;16*``: PNG, TIFF) at 255, so an ordinary photo comes out near-white:
    those are scaled to 8 bits (v / 257, rounded). 32-bit integer and floating-point pixels
    (``I``, ``F``) have no fixed white level, so they are refused rather than guessed. Pixels
    with transparency (an alpha band, or a palette or colour marked transparent) are composed
    over white, as viewers show them; dropping the alpha would show whatever colour the
    transparent pixels happen to hold.
    """
    # Pillow before 10 opens a 16-bit greyscale PNG as I (32-bit); PNG has no deeper samples, so
    # there I means 16 bits as surely as I;16 does.
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image).astype(np.uint32)
        values += 128  # in place: three 4-byte copies of a 50-megapixel image would be 600 MB
        values //= 257
        image = Image.fromarray(values.astype(np.uint8), "L")
    elif image.mode in ("I", "F") or image.mode.startswith(("I;", "F;")):
        raise DataError(
            f"{path} holds {image.mode} pixels (32-bit integers or floating point), which have no fixed white level; "
            "save it as an 8-bit JPEG or PNG."
        )
    if {"A", "a"} & set(image.getbands()) or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resize_centre(image: Image.Image, size: int) -> Image.Image:
    """The centre ``size x size`` crop of ``image`` resized so that its short side is ``size``
    (PIL's antialiased bilinear filter), computed without ever making the whole resized image.

    A 1 x 10000 JPEG is 3 KB, but resizing its short side to 256 makes the long side 2.56
    million pixels: 2 GB for a picture of which 256 x 256 pixels are kept. So the crop box is
    taken in source coordinates and only it is resampled, in the same two passes as a whole
    resize (horizontal on the rows the vertical pass reads, then vertical): the memory is that
    of the source image and two buffers of about ``size`` x its short side. Refusing thin
    images instead would refuse legitimate panoramas; this gives every image an answer.

    The result is the old resize-then-crop within 1 grey level (the filter positions are the
    same up to float rounding): on the VOC samples in ``shared/data`` 0.05-0.3 % of the values
    differ, by 1.
    """
    width, height = image.size
    new_w, new_h = resized_shape(width, height, size)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    x0, x1 = left * width / new_w, min(width, (left + size) * width / new_w)
    y0, y1 = top * height / new_h, min(height, (top + size) * height / new_h)
    reach = 2 * max(1.0, height / new_h) + 1  # rows beyond the box that the vertical filter reads
    r0, r1 = max(0, math.floor(y0 - reach)), min(height, math.ceil(y1 + reach))
    rows = image.crop((0, r0, width, r1)).resize((size, r1 - r0), Image.BILINEAR, box=(x0, 0, x1, r1 - r0))
    return rows.resize((size, size), Image.BILINEAR, box=(0, y0 - r0, size, y1 - r0))


#: What Pillow raises for a file it cannot read (a frame beyond its own bomb limits included).
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)


def _open_checked(file: object, path: Path) -> Image.Image:
    """``Image.open`` with the size checked from the header. Pillow's own check (a warning above
    89 megapixels, an error above 179) is superseded by ``MAX_IMAGE_PIXELS``, which is lower: its
    error becomes the same sentence, and its warning, about images refused here anyway, is silenced
    so that the user sees one sentence."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)
    except Image.DecompressionBombError as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise _too_large(path, f"{int(pixels.group(1)):,}" if pixels else "too many") from None
    try:
        _check_header(image, path)
    except DataError:
        image.close()
        raise
    return image


def open_resized(path: Path, size: int) -> torch.Tensor:
    """An image file (a JPEG in VOC; any format PIL reads) as uint8 3 x size x size: upright as
    its EXIF orientation says, 8-bit RGB (``to_rgb``), its short side resized to ``size`` and the
    centre ``size x size`` crop (``resize_centre``). Raises ``UNREADABLE`` as Pillow does, or a
    ``DataError`` naming the file (not a regular file, too many pixels, no fixed white level)."""
    with os.fdopen(open_regular(path), "rb") as file, _open_checked(file, path) as image:
        ImageOps.exif_transpose(image, in_place=True)  # a phone's portrait photo is stored sideways
        image = to_rgb(image, path)
    image = resize_centre(image, size)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def decode_resized(path: Path, size: int) -> torch.Tensor:
    """``open_resized`` for a data set's cache: a file that cannot be read is a ``DataError``
    naming it and the fix."""
    try:
        return open_resized(path, size)
    except UNREADABLE as error:
        raise DataError(
            f"{path} cannot be decoded as an image ({short_reason(error)}); replace it with a good copy (the data "
            "set's release has one) or remove it."
        ) from None
