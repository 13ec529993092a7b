"""Reading user images robustly: every PIL mode becomes RGB uint8, and every bad file becomes a named reason.

What is handled (all of it shows up in real photo folders):
- EXIF orientation (phones store portrait photos rotated plus a tag);
- palette ("P", with or without transparency), greyscale ("L", "1", "LA"), CMYK, 16-bit ("I;16*", "I"),
  float ("F") and alpha ("RGBA", "LA", "PA") images; alpha is composited on white (Chameleon's preprocessing);
- decompression bombs (a tiny file that expands to gigapixels) are refused before decoding;
- truncated, corrupt, zero-byte, non-image and unreadable files raise `BadImageError` with a short reason.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
# 8k x 8k: larger inputs are almost always bombs or scans nobody wants to tokenize at full size.
DEFAULT_MAX_PIXELS = 8192 * 8192


class BadImageError(ValueError):
    """An image file that cannot be used; `reason` is one short phrase, `path` the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def list_images(root: str | os.PathLike) -> list[Path]:
    """All files under `root` (recursively, sorted, symlinks included) whose extension looks like an image.

    Sorted so every process and every re-run sees the same order. A single file is returned as a 1-list.
    """
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        raise FileNotFoundError(f"image path does not exist: {root}")
    if root.is_file() or root.is_symlink() and not root.is_dir():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(Path(dirpath) / name)
    return sorted(found)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8, alpha composited on white."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        # 16-bit data is scaled by its nominal range, not clipped at 255 (PIL's convert("L") would clip).
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        arr = np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image file to an (H, W, 3) uint8 array, upright, alpha on white.

    Raises BadImageError (with the reason) for every kind of unusable file, never a bare PIL exception.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImageError(path, "unreadable: file not found (dangling link?)") from None
    except OSError as err:
        raise BadImageError(path, f"unreadable: {err.strerror or err}") from None
    if size == 0:
        raise BadImageError(path, "zero-byte file")
    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(handle)
            except UnidentifiedImageError:
                raise BadImageError(path, "not an image (format not recognised)") from None
            width, height = img.size
            if width * height > max_pixels:
                raise BadImageError(path, f"decompression bomb: {width}x{height} exceeds {max_pixels} pixels")
            try:
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb_array(img)
            except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
                raise BadImageError(path, f"decompression bomb: {err}") from None
            except OSError as err:
                text = str(err)
                if "truncated" in text:
                    raise BadImageError(path, "truncated image data") from None
                raise BadImageError(path, f"corrupt image data: {text}") from None
            except (ValueError, SyntaxError, IndexError, EOFError, TypeError) as err:
                raise BadImageError(path, f"corrupt image data: {err}") from None
    except BadImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadImageError(path, f"decompression bomb: {err}") from None
    except PermissionError as err:
        raise BadImageError(path, f"unreadable: {err.strerror}") from None
    except IsADirectoryError:
        raise BadImageError(path, "unreadable: is a directory") from None
    except OSError as err:
        raise BadImageError(path, f"unreadable: {err}") from None


def resize_shorter_side(image: np.ndarray, shorter: int, resample: str = "auto") -> np.ndarray:
    """(H, W, 3) uint8 -> resized so min(H, W) == shorter. resample "auto": bicubic when enlarging, Lanczos
    (antialiased) when shrinking; "lanczos": Lanczos both ways, as Chameleon's image tokenizer does."""
    height, width = image.shape[:2]
    scale = shorter / min(height, width)
    new_h, new_w = max(shorter, round(height * scale)), max(shorter, round(width * scale))
    if (new_h, new_w) == (height, width):
        return image
    resample = Image.BICUBIC if scale > 1 and resample == "auto" else Image.LANCZOS
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return image[top : top + size, left : left + size]


def preprocess(image: np.ndarray, resolution: int, resample: str = "auto") -> np.ndarray:
    """The tokenizer's view of an image: shorter side -> resolution, centre crop to resolution x resolution
    (`resample`: the tokenizer's model.resample)."""
    return center_crop(resize_shorter_side(image, resolution, resample), resolution)


def to_tensor(image: np.ndarray):
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    import torch

    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(images) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) tensor in [-1, 1] -> (..., H, W, 3) uint8."""
    arr = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to("cpu").numpy().astype(np.uint8)
    return np.moveaxis(arr, -3, -1)


def save_grid(rows: list, path: str | os.PathLike, pad: int = 2) -> None:
    """Save rows of (B, 3, H, W) tensors in [-1, 1] as one PNG (e.g. originals above reconstructions)."""
    arrays = [to_uint8(r) for r in rows]
    n_cols = max(a.shape[0] for a in arrays)
    height, width = arrays[0].shape[1:3]
    canvas = np.full((len(arrays) * (height + pad) + pad, n_cols * (width + pad) + pad, 3), 255, np.uint8)
    for row_index, arr in enumerate(arrays):
        for col_index, img in enumerate(arr):
            top, left = pad + row_index * (height + pad), pad + col_index * (width + pad)
            canvas[top : top + height, left : left + width] = img
    atomic_save_png(canvas, path)


def atomic_save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
