"""Decoding every accepted picture format, and refusing the rest with a clear reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from adapters import images
from adapters.images import load_pages, sniff
from pipeline.errors import UnreadableImageError


def page(width: int = 64, height: int = 48) -> np.ndarray:
    """A small picture with a distinct left/right and top/bottom, to catch flips."""
    rgb = np.full((height, width, 3), 255, np.uint8)
    rgb[: height // 2, : width // 2] = (200, 30, 30)  # red top-left quadrant
    rgb[height // 2 :, width // 2 :] = (20, 20, 20)  # black bottom-right quadrant
    return rgb


def encode(rgb: np.ndarray, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def mean_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [
        ("PNG", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("JPEG", {"quality": 95}, 3),  # lossy: chroma blurs at the quadrant edges
    ],
)
def test_raster_formats_decode_to_rgb(fmt: str, params: dict, tolerance: float) -> None:
    original = page()
    pages = load_pages(encode(original, fmt, **params), filename="scan.bin")
    assert len(pages) == 1
    decoded = pages[0]
    assert decoded.dtype == np.uint8 and decoded.shape == original.shape
    assert mean_error(decoded, original) <= tolerance


def test_type_comes_from_the_bytes_not_the_name() -> None:
    data = encode(page(), "PNG")
    assert sniff(data) == "png"
    pages = load_pages(data, media_type="image/jpeg", filename="wrongly-named.jpg")
    assert pages[0].shape == (48, 64, 3)


def test_jpeg_exif_orientation_is_applied() -> None:
    original = page(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(original, "JPEG", quality=95, exif=exif.tobytes())
    upright = load_pages(data)[0]
    assert upright.shape == (64, 48, 3)
    assert mean_error(upright, np.rot90(original, k=-1)) < 3
    assert mean_error(upright, np.rot90(original, k=1)) > 30  # and not the other way


def test_multipage_tiff_gives_every_page_up_to_max_pages() -> None:
    first, second = page(), 255 - page()
    buffer = io.BytesIO()
    Image.fromarray(first).save(buffer, format="TIFF", save_all=True,
                                append_images=[Image.fromarray(second)])
    data = buffer.getvalue()
    both = load_pages(data)
    assert len(both) == 2
    np.testing.assert_array_equal(both[1], second)
    assert len(load_pages(data, max_pages=1)) == 1


def test_transparency_is_flattened_onto_white() -> None:
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (0, 0, 0, 255)
    decoded = load_pages(encode(rgba, "PNG"))[0]
    assert (decoded[:, :5] == 0).all() and (decoded[:, 5:] == 255).all()


def test_16_bit_greyscale_is_scaled_to_8_bits() -> None:
    grey = np.full((8, 8), 65535, np.uint16)
    grey[:, :4] = 0
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    decoded = load_pages(buffer.getvalue())[0]
    assert decoded.shape == (8, 8, 3)
    assert (decoded[:, :4] == 0).all() and (decoded[:, 4:] == 255).all()


def make_pdf(pages: int = 2) -> bytes:
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument.new()
    for _ in range(pages):
        document.new_page(72 * 4, 72 * 3)  # 4 x 3 inches
    buffer = io.BytesIO()
    document.save(buffer)
    document.close()
    return buffer.getvalue()


def test_pdf_pages_render_at_200_dpi() -> None:
    data = make_pdf(2)
    assert sniff(data) == "pdf"
    pages = load_pages(data)
    assert len(pages) == 2
    assert pages[0].shape == (600, 800, 3)  # 3 x 4 inches at 200 dpi
    assert pages[0].dtype == np.uint8 and pages[0].min() == 255  # a blank white page
    assert len(load_pages(data, max_pages=1)) == 1


def test_pdf_drawn_by_pillow_keeps_its_ink() -> None:
    buffer = io.BytesIO()
    Image.fromarray(page(200, 150)).save(buffer, format="PDF", resolution=100)
    rendered = load_pages(buffer.getvalue())[0]
    assert rendered.shape == (300, 400, 3)  # 2 x 1.5 inches at 200 dpi
    assert rendered[-10:, -10:].mean() < 60  # the black quadrant survived
    assert rendered[5:20, 5:20, 0].mean() > rendered[5:20, 5:20, 1].mean() + 100  # red


def test_empty_file() -> None:
    with pytest.raises(UnreadableImageError, match="empty file"):
        load_pages(b"")


def test_truncated_file() -> None:
    data = encode(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8), "PNG")
    with pytest.raises(UnreadableImageError, match="PNG"):
        load_pages(data[: len(data) // 2])
    jpeg = encode(page(400, 300), "JPEG")
    with pytest.raises(UnreadableImageError, match="truncated JPEG"):
        load_pages(jpeg[: len(jpeg) // 2])


def test_not_an_image() -> None:
    with pytest.raises(UnreadableImageError, match="unsupported file type"):
        load_pages(b"patient,hr\nx,72\n", media_type="text/csv")
    with pytest.raises(UnreadableImageError, match="GIF"):
        load_pages(b"GIF89a" + b"\x00" * 20)


def test_corrupt_pdf() -> None:
    with pytest.raises(UnreadableImageError, match="PDF"):
        load_pages(b"%PDF-1.7\n this is not really a pdf")


def test_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(UnreadableImageError, match="too large"):
        load_pages(encode(page(64, 48), "PNG"))


def test_oversized_pdf_page_is_rendered_smaller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_PIXELS", 120_000)
    rendered = load_pages(make_pdf(1))[0]
    assert rendered.shape[0] * rendered.shape[1] <= 120_000
    assert rendered.shape[1] / rendered.shape[0] == pytest.approx(4 / 3, rel=0.02)
