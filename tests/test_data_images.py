import io

import numpy as np
import pytest
from PIL import Image

from transferkit.data import images
from transferkit.data.images import IMAGE_EXTENSIONS, ImageDecodeError, load_rgb
from transferkit.errors import DataError
from torture import bomb_png, encode, exif_rotated_jpeg, random_rgb


def _save(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_extensions_cover_the_usual_formats():
    assert {"jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm"} <= IMAGE_EXTENSIONS


def test_rgb_stays_rgb(tmp_path):
    img = load_rgb(_save(tmp_path, "a.png", encode(random_rgb(1), "PNG")))
    assert img.mode == "RGB" and img.size == (32, 32)
    assert np.array_equal(np.asarray(img), np.asarray(random_rgb(1)))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    red = Image.new("RGB", (16, 16), (220, 30, 30)).convert("CMYK")
    img = load_rgb(_save(tmp_path, "cmyk.jpg", encode(red, "JPEG", quality=95)))
    assert img.mode == "RGB"
    r, g, b = np.asarray(img).reshape(-1, 3).mean(axis=0)
    assert r > 180 and g < 80 and b < 80


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = _save(tmp_path, "g16.png", encode(Image.fromarray(values), "PNG"))
    assert Image.open(path).mode.startswith("I")
    img = load_rgb(path)
    assert img.mode == "RGB"
    assert np.asarray(img)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_mode_i_and_f_are_scaled():
    as_i = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))
    assert as_i.mode == "I"
    assert np.asarray(images.to_rgb(as_i))[0, :, 1].tolist() == [0, 4, 255]
    as_f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert as_f.mode == "F"
    assert np.asarray(images.to_rgb(as_f))[0, :, 2].tolist() == [0, 128, 255]


def test_rgba_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    img = load_rgb(_save(tmp_path, "rgba.png", encode(rgba, "PNG")))
    px = np.asarray(img)
    assert px[0, 0].tolist() == [255, 0, 0]
    assert px[5, 5].tolist() == [255, 255, 255]  # fully transparent -> white, not red or black
    assert px[0, 1, 0] == 255 and 120 <= px[0, 1, 1] <= 135


def test_la_palette_and_bilevel_modes(tmp_path):
    la = Image.new("LA", (8, 8), (0, 0))
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0] + [0, 255, 0] * 255)
    for name, img, params in (
        ("la.png", la, {}),
        ("pal.png", pal, {"transparency": 0}),
        ("bilevel.png", Image.new("1", (8, 8), 1), {}),
        ("gray.png", Image.new("L", (8, 8), 77), {}),
    ):
        out = load_rgb(_save(tmp_path, name, encode(img, "PNG", **params)))
        assert out.mode == "RGB", name
    assert np.asarray(load_rgb(tmp_path / "la.png"))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_rgb(tmp_path / "pal.png"))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_rgb(tmp_path / "gray.png"))[0, 0].tolist() == [77, 77, 77]


def test_exif_orientation_is_applied(tmp_path):
    path = _save(tmp_path, "rot.jpg", exif_rotated_jpeg(40, 24))
    assert Image.open(path).size == (40, 24)
    assert load_rgb(path).size == (24, 40)


@pytest.mark.parametrize(
    "name, data, kind",
    [
        ("empty.jpg", b"", "empty_file"),
        ("text.jpg", b"plain text", "not_an_image"),
        ("cut.png", encode(random_rgb(3, (64, 64)), "PNG")[:300], "corrupt"),
        ("cut.jpg", encode(random_rgb(3, (64, 64)), "JPEG")[:600], "corrupt"),
    ],
)
def test_unusable_files_raise_with_a_kind(tmp_path, name, data, kind):
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(_save(tmp_path, name, data))
    assert info.value.kind == kind
    assert isinstance(info.value, DataError)
    assert "\n" not in str(info.value)


def test_decompression_bomb_is_refused_with_its_size(tmp_path):
    path = _save(tmp_path, "bomb.png", bomb_png(12000, 8000))
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert info.value.kind == "decompression_bomb"
    assert "decompression bomb: 12000×8000 pixels exceeds Pillow's limit" in str(info.value)


def test_bomb_beyond_twice_the_limit_is_refused(tmp_path, monkeypatch):
    # Over 2× the limit Pillow raises inside Image.open instead of warning.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(_save(tmp_path, "big.png", encode(random_rgb(4, (64, 64)), "PNG")))
    assert info.value.kind == "decompression_bomb"
    # in the words of the bomb under 2× the limit, naming the limit itself: Pillow's "Image size (4096 pixels)
    # exceeds limit of 2000 pixels, could be decompression bomb DOS attack." named twice the limit
    assert info.value.reason == ("decompression bomb: 4096 pixels exceeds Pillow's limit of 1000 pixels "
                                 "(Image.MAX_IMAGE_PIXELS); downscale the image if it is genuine")


def test_truncated_images_setting_is_left_alone(tmp_path):
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageDecodeError):
        load_rgb(_save(tmp_path, "cut.jpg", encode(random_rgb(5, (64, 64)), "JPEG")[:600]))
    assert ImageFile.LOAD_TRUNCATED_IMAGES == before


def test_permission_denied_is_unreadable(tmp_path, monkeypatch):
    path = _save(tmp_path, "a.png", encode(random_rgb(6), "PNG"))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Simulated, because the test may run as root, which can read a chmod 000 file.
    monkeypatch.setattr(images, "open", denied, raising=False)
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert info.value.kind == "unreadable"


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(tmp_path)
    assert info.value.kind == "unreadable"
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(tmp_path / "nope.png")
    assert info.value.kind == "unreadable"


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("P", (10, 10), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert load_rgb(_save(tmp_path, "anim.gif", buf.getvalue())).size == (10, 10)



def _tiff_with_a_bad_tag() -> bytes:
    """A TIFF whose PlanarConfiguration tag (284) claims two values: Pillow warns "Metadata Warning, tag 284 had too
    many entries" and reads the picture all the same."""
    import struct

    data = bytearray(encode(random_rgb(8, (40, 30)), "TIFF"))
    assert data[:2] == b"II"
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry:entry + 2])[0] == 284:
            data[entry + 4:entry + 8] = struct.pack("<I", 2)
    return bytes(data)


def test_pillow_warnings_about_a_file_stay_out_of_the_terminal(tmp_path):
    # They reached the user as "…/PIL/TiffImagePlugin.py:773: UserWarning: Metadata Warning, tag 284 had too many
    # entries: 2, expected 1" plus Pillow's source line, from predict, the scan and data check alike.
    import warnings

    from transferkit.data.folders import sixteen_bit_white
    from transferkit.data.images import load_rgb_bytes, read_for_model
    from transferkit.search.state import _median_shorter_side

    data = _tiff_with_a_bad_tag()
    path = _save(tmp_path, "tagged.tif", data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_rgb(path).size == (40, 30)
        assert load_rgb_bytes(data, "upload.tif").size == (40, 30)
        assert read_for_model(str(path), 64).size == (40, 30)
        # the scan's 16-bit sample and the recipe search's size look read headers of training images too
        assert sixteen_bit_white([str(path)]) is None and _median_shorter_side([str(path)]) == 30
    assert [str(w.message) for w in caught] == []
    with warnings.catch_warnings(record=True) as caught:  # the user's own warnings filters are as they were
        warnings.simplefilter("always")
        Image.open(path).load()
    assert any("Metadata Warning" in str(w.message) for w in caught)

def _photo(width=1600, height=1200) -> Image.Image:
    """A smooth 'photo': large enough that a reduced-scale JPEG decode applies (images.DRAFT_MARGIN)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(xx / 37), 128 + 100 * np.cos(yy / 23), (xx + yy) % 256], -1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def test_large_jpeg_decodes_at_a_reduced_scale_and_resizes_alike(tmp_path):
    from transferkit.data.images import read_rgb

    path = _save(tmp_path, "photo.jpg", encode(_photo(), "JPEG", quality=90))
    small, size = read_rgb(path, shorter_side=128)
    full = load_rgb(path)
    assert size == full.size == (1600, 1200)
    assert small.size == (400, 300)  # 1/4 scale: the smallest whose shorter side keeps 2 × 128
    assert min(small.size) >= images.DRAFT_MARGIN * 128
    # what the caller does next (resize the shorter side to 128) gives nearly the same pixels
    a, b = (np.asarray(im.resize((171, 128), Image.BICUBIC), dtype=np.float32) for im in (small, full))
    assert np.abs(a - b).mean() < 1.0
    # without a size, or when the image is not large enough, a full decode
    assert load_rgb(path, shorter_side=600).size == (1600, 1200)


def test_reduced_decode_keeps_png_and_errors(tmp_path):
    png = _save(tmp_path, "big.png", encode(_photo(), "PNG"))
    assert load_rgb(png, shorter_side=64).size == (1600, 1200)  # no DCT to scale
    data = encode(_photo(), "JPEG", quality=90)
    cut = _save(tmp_path, "cut.jpg", data[: len(data) // 2])
    with pytest.raises(ImageDecodeError) as err:
        load_rgb(cut, shorter_side=64)  # a reduced-scale decode still reads the whole file
    assert err.value.kind == "corrupt"


def test_reduced_decode_reports_the_oriented_stored_size(tmp_path):
    from transferkit.data.images import read_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    path = tmp_path / "turned.jpg"
    _photo().save(path, "JPEG", quality=90, exif=exif)
    img, size = read_rgb(path, shorter_side=128)
    assert size == (1200, 1600) and img.size == (300, 400)


def test_phone_mpo_jpeg_decodes_at_a_reduced_scale_too(tmp_path):
    from transferkit.data.images import read_rgb

    path = tmp_path / "phone.jpg"
    _photo().save(path, "MPO", save_all=True, append_images=[_photo(800, 600)])
    assert Image.open(path).format == "MPO"
    img, size = read_rgb(path, shorter_side=128)
    assert size == (1600, 1200) and img.size == (400, 300)
