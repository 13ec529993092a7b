"""Pictures as pixels for the continuous encoder-adapter path: what `unified-lm prepare --encoder` stores.

In a continuous-path packed dataset a picture is `<boi>`, `placeholders` x `<image>`, `<eoi>` in the token rows,
and its pixels live beside the rows, once per distinct picture file:

    PACKED/pictures.u8      (count, size, size, 3) uint8 RGB, pictures at the encoder's input size (pictures-b.u8
                            after a re-prepare: see packing.DatasetStaging)
    PACKED/shards/*.pictures   (rows, seq_len + 1) int32 per token: picture * placeholders + patch at each
                               placeholder, -1 elsewhere (so a picture split across rows keeps its patch order)

Training encodes the pixels of the pictures a batch needs with the model's image encoder and adapter, and puts
feature `patch` of picture `picture` at each placeholder (see `UnifiedTransformer.embed_tokens`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from unified_lm.tokens.documents import Document, ImageSegment

PIXELS_FILE = "pictures.u8"


class ContinuousPictures:
    """Numbers every distinct picture file of the documents (in document order) and writes their pixels."""

    def __init__(self, documents: list[Document], image_size: int, placeholders: int):
        self.image_size, self.placeholders = image_size, placeholders
        self.where: dict[Path, str] = {}
        for document in documents:
            for segment in document.segments:
                if isinstance(segment, ImageSegment):
                    if segment.path is None:
                        raise ValueError(f"{document.where}: the continuous path reads picture files; an image_ref "
                                         "into a token store holds codes, not pixels")
                    self.where.setdefault(segment.path, document.where)
        self.numbers = {path: number for number, path in enumerate(self.where)}

    def __len__(self) -> int:
        return len(self.numbers)

    def index(self, segment: ImageSegment, where: str) -> int:
        if segment.path not in self.numbers:
            raise KeyError(f"{where}: picture {segment.path} was not registered")
        return self.numbers[segment.path]

    def write(self, target: Path) -> dict:
        """Load, square-crop and resize every picture into `target` (a packed dataset's pictures.u8, written
        atomically); returns its description. A missing or corrupt picture names the file and the first
        document that uses it, and leaves nothing behind."""
        from vqtok.images import BadImageError, load_rgb, preprocess

        shape = (len(self), self.image_size, self.image_size, 3)
        building = target.with_name(target.name + ".building")
        if not len(self):
            target.write_bytes(b"")
            return self.describe(target.name)
        pixels = np.memmap(building, dtype=np.uint8, mode="w+", shape=shape)
        try:
            for path, number in self.numbers.items():
                try:
                    pixels[number] = preprocess(load_rgb(path), self.image_size)
                except BadImageError as err:
                    raise ValueError(f"{self.where[path]}: cannot read picture {err.path}: {err.reason}") from None
                except FileNotFoundError:
                    raise FileNotFoundError(f"{self.where[path]}: picture not found: {path}") from None
            pixels.flush()
        except BaseException:
            del pixels
            building.unlink(missing_ok=True)
            raise
        del pixels
        os.replace(building, target)
        return self.describe(target.name)

    def describe(self, file: str = PIXELS_FILE) -> dict:
        return {"file": file, "count": len(self), "image_size": self.image_size, "placeholders": self.placeholders}


def open_pixels(root: Path, description: dict) -> np.ndarray:
    """The (count, size, size, 3) uint8 pixels of a continuous-path dataset, checked against dataset.json."""
    from runkit.files import confined

    try:
        path = confined(root, description["file"], f"{root / 'dataset.json'} pictures.file")
        size, count = int(description["image_size"]), int(description["count"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{root / 'dataset.json'}: malformed pictures entry ({err})") from None
    expected = count * size * size * 3
    if not path.is_file() or path.stat().st_size != expected:
        raise ValueError(f"{path}: missing or truncated (expected {expected} bytes); re-run `unified-lm prepare`")
    if not expected:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(count, size, size, 3))
