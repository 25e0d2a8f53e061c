"""Image decoding and preprocessing: file -> 8-bit RGB PIL image -> normalised CLIP tensor.

This module owns the constants that define what the vision tower sees (the OpenAI CLIP
mean/std that Chinese-CLIP was trained with), which file types count as images, and the
registration of the decoders for phone formats (HEIC/HEIF through pillow-heif, AVIF).
`preprocess` reproduces `cn_clip.clip.image_transform` (bicubic squash to a square, no crop)
for RGB inputs, but with numpy instead of torchvision so a worker process stays light.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from cnclip.errors import ImageError

if TYPE_CHECKING:  # imported where tensors are made: opening images must not load torch
    import torch

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "HEIF_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "ImageTransform",
    "load_image",
    "preprocess",
    "to_rgb",
]

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Pillow warns above MAX_IMAGE_PIXELS (~89.5 MP) and refuses above twice that. We use the
# refusal threshold as our default cap: real photos (even 100+ MP medium-format frames) pass,
# while a few-KB file claiming a gigapixel canvas is rejected before any memory is allocated.
# Spelled out rather than read from Pillow so that a caller who changes Pillow's global at
# runtime does not silently change cnclip's behaviour.
DEFAULT_MAX_PIXELS: int = 178_956_970


# HEIF is what iPhones shoot (.heic) and what Canon and Fujifilm cameras write (.hif); pillow-heif
# decodes it. Image sequences (.heics, .heifs) are left out: they are bursts, not photos.
HEIF_EXTENSIONS: frozenset[str] = frozenset({".heic", ".heif", ".hif"})


def _register_decoders() -> dict[str, str]:
    """Register pillow-heif's HEIF opener with Pillow (once, at import).

    Returns extension -> what to install, for each phone format this Python cannot decode.
    """
    missing: dict[str, str] = {}
    try:
        import pillow_heif  # type: ignore[import-not-found]
    except (ImportError, OSError):  # a core dependency, so this is an install made without it
        for ext in HEIF_EXTENSIONS:
            missing[ext] = "HEIC/HEIF photos need the pillow-heif package: pip install pillow-heif"
    else:
        # pillow-heif applies the file's rotation (irot/imir) while decoding and resets the EXIF
        # orientation to 1, so exif_transpose in load_image cannot turn a HEIC twice.
        pillow_heif.register_heif_opener()
    # AVIF is Pillow's own (its wheels include libavif from 11.3; older Pillows lack the feature
    # name). Pillow turns the file's irot/imir into the EXIF orientation, which exif_transpose applies.
    if not ("avif" in features.modules and features.check("avif")):
        missing[".avif"] = "AVIF photos need Pillow 11.3 or newer: pip install -U pillow"
    return missing


# Checked when Pillow cannot identify a file: a phone photo then gets the fix, not "unknown format".
_MISSING_DECODERS: dict[str, str] = _register_decoders()

# Every phone format is listed even where its decoder is missing, so such files are reported as
# skipped with the install hint instead of being passed by in silence.
#
# Live Photos: an iPhone Live Photo is IMG_1234.HEIC (or .JPG) plus IMG_1234.MOV in the same folder.
# .mov is not listed, so a folder walk indexes the still once and passes the video by. Video support
# (issue 18) must keep that rule: a .MOV beside a still of the same name is that photo's motion, not a
# second photo, and indexing it would show every Live Photo twice in results.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".avif", *HEIF_EXTENSIONS}
    | ({".webp"} if features.check("webp") else set())  # WebP is optional in a Pillow build: ask it
)

# Formats whose decoder can skip work when a smaller image will do: JPEG scales in the DCT domain,
# HEIF decodes an embedded thumbnail (iPhones store a 320x240 one) instead of the full 12 MP frame.
_DRAFT_FORMATS = frozenset({"JPEG", "MPO", "HEIF"})

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_INT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _has_alpha(img: Image.Image) -> bool:
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return True
    # A palette can carry alpha itself (e.g. palettised WebP/PNG re-encoded by Pillow).
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def _rescale_to_l(img: Image.Image) -> Image.Image:
    """High-bit-depth greyscale -> 8-bit 'L'; Pillow's own convert clips everything above 255."""
    arr = np.asarray(img)
    if img.mode in _INT16_MODES:
        # A 16-bit file has a nominal range, so keep its brightness: 65535 is white.
        lo, hi = 0.0, 65535.0
    else:
        data = arr.astype(np.float64)
        finite = data[np.isfinite(data)]
        dmin = float(finite.min()) if finite.size else 0.0
        dmax = float(finite.max()) if finite.size else 0.0
        if img.mode == "I" and dmin >= 0 and dmax <= 65535:
            # 16-bit PNG/TIFF data often arrives widened to 32-bit 'I'.
            lo, hi = 0.0, 65535.0
        elif img.mode == "F" and dmin >= 0 and dmax <= 1:
            # Float images are conventionally 0..1.
            lo, hi = 0.0, 1.0
        else:
            # No nominal range to honour: stretch the data's own range.
            lo, hi = dmin, dmax
        arr = np.nan_to_num(data, nan=lo, posinf=hi, neginf=lo)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip(np.rint((arr.astype(np.float64) - lo) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency over white.

    RGB input is returned as is. Raises ImageError for a mode Pillow cannot convert.
    """
    if img.mode == "RGB":
        return img
    try:
        if img.mode in _INT16_MODES or img.mode in ("I", "F"):
            return _rescale_to_l(img).convert("RGB")
        if _has_alpha(img):
            # A plain convert('RGB') drops alpha and exposes whatever colour the encoder left
            # under transparent pixels (often black); photos of logos/stickers look wrong.
            if img.mode == "La":
                img = img.convert("LA")  # Pillow has no direct La -> RGBA path
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"cannot convert image mode {img.mode!r} to RGB ({exc})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode an image file to 8-bit RGB, upright per EXIF, first frame if animated.

    `max_pixels` is checked against the header before decoding. `draft_size` lets JPEGs
    decode at a reduced scale whose sides stay >= draft_size (much faster for big photos).
    Every failure raises ImageError naming the file.
    """
    name = os.fsdecode(path)
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if draft_size is not None and draft_size <= 0:
        raise ValueError(f"draft_size must be positive, got {draft_size}")

    try:
        fh = open(path, "rb")  # closed by the with-block just below
    except FileNotFoundError as exc:
        raise ImageError(f"{name}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{name}: is a directory, not an image file") from exc
    except PermissionError as exc:
        raise ImageError(f"{name}: permission denied; check the file's read permissions") from exc
    except OSError as exc:
        raise ImageError(f"{name}: cannot open file ({exc.strerror or _first_line(exc)})") from exc

    with fh, warnings.catch_warnings():
        # We enforce our own cap below, so Pillow's bomb warning is noise. (catch_warnings is
        # process-global state; it is safe in DataLoader worker processes, not across threads.)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            st = os.fstat(fh.fileno())
            if stat.S_ISDIR(st.st_mode):  # some platforms open directories without error
                raise ImageError(f"{name}: is a directory, not an image file")
            if st.st_size == 0:
                raise ImageError(f"{name}: empty file (0 bytes)")

            img = Image.open(fh)  # reads the header only
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{name}: {width}x{height} = {width * height:,} pixels exceeds the "
                    f"max_pixels cap of {max_pixels:,}; pass a larger max_pixels if the file is trusted"
                )
            if draft_size is not None and img.format in _DRAFT_FORMATS:
                # Both sides stay >= draft_size. JPEG: a DCT-domain downscale by 1/2, 1/4 or 1/8 that
                # skips most of the IDCT work. HEIF: the smallest embedded thumbnail that is big
                # enough, if any (about 5 ms instead of 400 ms for an iPhone photo).
                img.draft("RGB", (draft_size, draft_size))
            # Decoding happens here, inside the try, so truncated data fails in this function
            # rather than later in a resize. Animated GIF/WebP stay on their first frame.
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(img)
        except ImageError as exc:
            msg = str(exc)
            raise ImageError(msg if msg.startswith(f"{name}:") else f"{name}: {msg}") from exc
        except Image.DecompressionBombError as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(found.group(1)):,} pixels" if found else "its pixel count"
            raise ImageError(
                f"{name}: {size} exceeds Pillow's decompression-bomb limit; raise "
                "PIL.Image.MAX_IMAGE_PIXELS (and max_pixels) if the file is trusted"
            ) from exc
        except UnidentifiedImageError as exc:
            hint = _MISSING_DECODERS.get(os.path.splitext(name)[1].lower())
            if hint is not None:
                raise ImageError(f"{name}: {hint}") from exc
            raise ImageError(f"{name}: not an image Pillow can read (unknown format or wrong extension)") from exc
        except PermissionError as exc:
            raise ImageError(f"{name}: permission denied; check the file's read permissions") from exc
        except MemoryError as exc:
            raise ImageError(f"{name}: out of memory while decoding; lower max_pixels or use draft_size") from exc
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
            # Pillow signals bad data with a zoo of exception types depending on the plugin.
            raise ImageError(f"{name}: truncated or corrupt image data ({_first_line(exc)})") from exc


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


_MEAN = np.asarray(OPENAI_MEAN, dtype=np.float32)
_STD = np.asarray(OPENAI_STD, dtype=np.float32)


def preprocess(img: Image.Image, image_size: int) -> torch.Tensor:
    """PIL image -> float32 tensor (3, s, s), normalised exactly like cn_clip's image_transform."""
    _check_size(image_size)
    resized = to_rgb(img).resize((image_size, image_size), Image.Resampling.BICUBIC)
    # Same float32 operations in the same order as ToTensor + Normalize, so results match
    # the reference to the last bit or two rather than merely approximately.
    arr = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    arr = (arr - _MEAN) / _STD
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class ImageTransform:
    """Picklable callable for a fixed input size: `ImageTransform(224)(img)` -> (3, 224, 224)."""

    def __init__(self, image_size: int) -> None:
        _check_size(image_size)
        self.image_size = image_size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Preprocess one image to (3, s, s) float32."""
        return preprocess(img, self.image_size)

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess several images into one (N, 3, s, s) float32 tensor."""
        import torch

        if len(images) == 0:
            return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.float32)
        return torch.stack([self(img) for img in images])

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, resize=bicubic squash, mean={OPENAI_MEAN}, std={OPENAI_STD})"
        )
