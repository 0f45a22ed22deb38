"""Reading images as every entry point reads them (an appendix; no torch, so that onnx_detect.py can use it).

One rule for training, evaluation, eval.py --image and onnx_detect.py: the EXIF orientation applied (unless
an annotation file's size says the boxes were drawn on the stored pixels), every mode made RGB, 16-bit
images scaled to 8 bits (PIL's convert would clip them to white), and a file that cannot be read named in
one line.
"""
import glob
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


class DataError(ValueError):
    """A user's data is wrong: the message names the file, the entry and the field."""


def stored_image_size(path: Path) -> tuple[int, int]:
    """(width, height) as read_image(path, None) gives it, from the file's header alone."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)  # EXIF orientations 5..8 turn the image by 90 degrees
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


HIGH_BIT_DEPTH = {"I;16": 8, "I;16L": 8, "I;16B": 8, "I;16N": 8, "I": 8}  # PIL mode -> bits to drop for 8-bit


def read_image(path: Path, json_size: tuple[int, int] | None) -> Image.Image:
    """RGB image with its EXIF orientation applied, unless the annotation file's (width, height) says
    the annotations were made on the stored pixels (a rotation that swaps width and height). 16-bit
    images are scaled to 8 bits (PIL's convert would clip them to white)."""
    try:
        with Image.open(path) as raw:
            raw.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    image = ImageOps.exif_transpose(raw)
    if json_size is not None and image.size != json_size:
        if raw.size != json_size:
            raise DataError(f"image {path} is {image.size[0]}x{image.size[1]} but the annotation file says "
                            f"{json_size[0]}x{json_size[1]}")
        image = raw
    return rgb(image, path)


def rgb(image: Image.Image, path="the image") -> Image.Image:
    """`image` as 8-bit RGB: grayscale, palette, RGBA and CMYK converted by PIL; 16-bit grayscale scaled to 8
    bits (PIL's convert would clip it to white; PIL reads 16-bit colour PNGs as 8-bit RGB itself)."""
    if image.mode in HIGH_BIT_DEPTH:
        pixels = np.asarray(image, dtype=np.int64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise DataError(f"image {path} has {image.mode} pixels outside 0..65535")
        image = Image.fromarray((pixels >> HIGH_BIT_DEPTH[image.mode]).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise DataError(f"image {path} has floating-point pixels (PIL mode F): convert it to 8 or 16 bits")
    return image.convert("RGB")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_files(items: list[str], flag: str = "--image") -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns (`photos/**/*.jpg`) -> image files, in order;
    a DataError names an item that gives none, a warning the files of a folder left out (not images by
    their names: IMAGE_SUFFIXES). A file named as an image that is none is read_image's error."""
    files = []
    for item in items:
        if any(c in item for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        elif Path(item).is_dir():
            entries = sorted(p for p in Path(item).iterdir() if p.is_file() and not p.name.startswith("."))
            found = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
            if len(found) < len(entries):
                left_out = [p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
                warnings.warn(f"{flag} {item}: left out {len(left_out)} file(s) that are not images by their names: "
                              f"{', '.join(left_out[:5])}{' ...' if len(left_out) > 5 else ''}", stacklevel=2)
        else:
            found = [Path(item)]
        if not found:
            raise DataError(f"{flag} {item}: no image files there")
        files += found
    return files
