"""Image decoding: every PIL mode to RGB, alpha on white, EXIF orientation, and every bad-file kind named."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vqtok.images import BadImageError, list_images, load_rgb, preprocess


def save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def test_modes_become_rgb(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    cases = {
        "p.png": base.convert("P"), "l.png": base.convert("L"), "one.png": base.convert("1"),
        "cmyk.jpg": base.convert("CMYK"), "rgb.bmp": base,
    }
    for name, img in cases.items():
        out = load_rgb(save(img, tmp_path / name))
        assert out.shape == (20, 30, 3) and out.dtype == np.uint8, name
    assert np.array_equal(load_rgb(tmp_path / "rgb.bmp"), rgb)
    grey = load_rgb(tmp_path / "l.png")
    assert np.array_equal(grey[..., 0], grey[..., 2])


def test_16_bit_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    out = load_rgb(path)[0, :, 0]
    assert out.tolist() == [0, 128, 255]


def test_alpha_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:2, :, 3] = 0  # top half fully transparent
    rgba[2:, :, 3] = 255
    out = load_rgb(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert (out[:2] == 255).all()  # transparent -> white
    assert out[2:].reshape(-1, 3).tolist() == [[255, 0, 0]] * 8
    palette = Image.fromarray(rgba, "RGBA").convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    out_p = load_rgb(save(palette, tmp_path / "p.png", transparency=palette.getpixel((0, 0))))
    assert (out_p[:2] == 255).all()
    la = Image.fromarray(rgba, "RGBA").convert("LA")
    assert (load_rgb(save(la, tmp_path / "la.png"))[:2] == 255).all()


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_rgb(path).shape == (40, 20, 3)


def test_every_bad_file_kind_is_named(tmp_path, bad_image_files):
    for kind, (path, expected) in bad_image_files(tmp_path).items():
        with pytest.raises(BadImageError) as info:
            load_rgb(path, max_pixels=50_000_000)
        assert expected in info.value.reason, (kind, info.value.reason)
        assert info.value.path == str(path)


def test_list_images_recursive_sorted(image_folder):
    paths = list_images(image_folder)
    assert len(paths) == 12 and paths == sorted(paths)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(image_folder / "nope")


def test_preprocess_shorter_side_and_centre_crop():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[:, 95:105] = 255  # a bar in the middle survives the centre crop
    out = preprocess(image, 32)
    assert out.shape == (32, 32, 3)
    assert out[:, 16].mean() > 200 and out[:, 0].mean() < 10
