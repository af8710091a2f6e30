"""Safe reading of images and masks: the file is opened and fully decoded, never silently padded.

Pillow can be told to accept truncated files (`ImageFile.LOAD_TRUNCATED_IMAGES = True`, which some
libraries set globally); it then fills the missing rows with black. `read_image` turns that setting off
while it decodes, so a truncated file always raises `ImageReadError`.

Example:
    >>> from zsadkit.data.images import is_image_file
    >>> is_image_file("bottle/test/good/000.png"), is_image_file("readme.txt")
    (True, False)
"""

from __future__ import annotations

import threading
from pathlib import Path

from PIL import Image, ImageFile

from zsadkit.data.errors import ImageReadError, MaskError

__all__ = ["IMAGE_EXTENSIONS", "check_mask_matches_image", "is_image_file", "read_image", "visible_entries"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_TRUNCATION_SETTING_LOCK = threading.Lock()


def is_image_file(path: str | Path) -> bool:
    """True when the file name has one of `IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def visible_entries(folder: str | Path) -> list[Path]:
    """Entries of a folder, sorted by name, without hidden files (names starting with ".")."""
    return sorted(p for p in Path(folder).iterdir() if not p.name.startswith("."))


def read_image(path: str | Path, what: str = "image") -> Image.Image:
    """Open and fully decode an image file, keeping its mode ("RGB", "L", "P", ...).

    Args:
        path: the image file.
        what: what the file is, for the error message ("image", "mask").

    Raises:
        ImageReadError: the file is missing, not an image, or truncated/corrupt; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: {what} file is missing (expected a readable image file)")
    with _TRUNCATION_SETTING_LOCK:
        accept_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... for bad files
            raise ImageReadError(
                f"{path}: cannot read {what} ({type(err).__name__}: {err}); "
                "expected a complete, readable image file"
            ) from err
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = accept_truncated
    return image


def check_mask_matches_image(image: Image.Image, mask: Image.Image, image_path: str, mask_path: str) -> None:
    """Raise `MaskError` unless `mask` has the same (width, height) as `image`."""
    if image.size != mask.size:
        raise MaskError(
            f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]} (WxH) but its image {image_path} is "
            f"{image.size[0]}x{image.size[1]}; expected the same size"
        )
