"""Decode uploaded files into RGB pages: PNG, JPEG, TIFF, BMP, WebP and PDF.

The type is read from the file's first bytes, never from its name or declared media type:
scanners and integration engines label files carelessly, and a wrong extension must not
turn a good scan into an error (or a PDF into garbage pixels). Anything that cannot be
decoded raises :class:`UnreadableImageError` with a one-line reason that names no file.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from pipeline.errors import UnreadableImageError

MAX_PIXELS = 120_000_000
"""Largest page accepted (about a 48 MP photo or an A3 scan at 600 dpi, with room):
a bigger one is a decompression bomb or a mistake, and would exhaust a worker's memory."""
PDF_DPI = 200.0
"""Resolution PDF pages are rendered at: 8 px/mm, plenty for a 0.1 mm ECG trace."""
_PDF_POINTS_PER_INCH = 72.0

_SIGNATURES: tuple[tuple[str, bytes], ...] = (
    ("png", b"\x89PNG\r\n\x1a\n"),
    ("jpeg", b"\xff\xd8\xff"),
    ("tiff", b"II*\x00"),
    ("tiff", b"MM\x00*"),
    ("tiff", b"II+\x00"),  # BigTIFF
    ("tiff", b"MM\x00+"),
    ("bmp", b"BM"),
)
_PDF_MAGIC = b"%PDF-"
_PDF_MAGIC_WINDOW = 1024
"""PDF readers accept the header anywhere in the first kilobyte."""
_KNOWN_OTHER = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
                (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"PK\x03\x04", "ZIP"))


def sniff(data: bytes) -> str | None:
    """The decodable kind of ``data`` (``png``, ``jpeg``, ``tiff``, ``bmp``, ``webp``, ``pdf``)."""
    for kind, magic in _SIGNATURES:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if _PDF_MAGIC in data[:_PDF_MAGIC_WINDOW]:
        return "pdf"
    return None


def _describe_unknown(data: bytes, media_type: str | None) -> str:
    for magic, name in _KNOWN_OTHER:
        if data.startswith(magic):
            return f"unsupported file type: {name} (accepted: PNG, JPEG, TIFF, BMP, WebP, PDF)"
    declared = f" (declared {media_type})" if media_type else ""
    return f"unsupported file type{declared}: not a PNG, JPEG, TIFF, BMP, WebP or PDF file"


def load_pages(
    data: bytes,
    *,
    media_type: str | None = None,
    filename: str | None = None,
    max_pages: int | None = None,
) -> list[np.ndarray]:
    """Decode ``data`` into a list of pages, each an ``(H, W, 3)`` RGB uint8 array.

    A multi-page TIFF or a PDF gives one page per frame, up to ``max_pages``. JPEG EXIF
    orientation is applied, transparency is flattened onto white paper, 16-bit greyscale
    is scaled to 8 bits. ``media_type`` and ``filename`` only improve the error message;
    the content decides the type.
    """
    del filename  # the bytes decide; a file name is PHI-prone and not echoed either
    if max_pages is not None and max_pages < 1:
        raise ValueError("max_pages must be at least 1")
    if not data:
        raise UnreadableImageError("empty file (0 bytes)")
    kind = sniff(data)
    if kind is None:
        raise UnreadableImageError(_describe_unknown(data, media_type))
    pages = _load_pdf(data, max_pages) if kind == "pdf" else _load_raster(data, kind, max_pages)
    if not pages:
        raise UnreadableImageError(f"{kind.upper()} file holds no pages")
    return pages


def _load_raster(data: bytes, kind: str, max_pages: int | None) -> list[np.ndarray]:
    label = kind.upper()
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns; ours below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                pages = []
                for frame in _frames(image, kind):
                    _check_size(frame.width, frame.height)
                    pages.append(_to_rgb(frame))
                    if max_pages is not None and len(pages) >= max_pages:
                        break
                return pages
    except UnreadableImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(f"image too large ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc).split("\n", 1)[0] or type(exc).__name__
        if "truncated" in reason:
            raise UnreadableImageError(f"truncated {label} file: {reason}") from exc
        raise UnreadableImageError(f"corrupt {label} file: {reason}") from exc


def _frames(image: Image.Image, kind: str) -> Iterator[Image.Image]:
    """Every page of a TIFF; the one picture of anything else (an animated WebP is one page)."""
    if kind == "tiff":
        yield from ImageSequence.Iterator(image)
    else:
        yield image


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise UnreadableImageError(f"image has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise UnreadableImageError(
            f"image too large: {width}x{height} pixels (limit {MAX_PIXELS // 1_000_000} MP)"
        )


def _to_rgb(frame: Image.Image) -> np.ndarray:
    """Decode one frame to RGB uint8, upright and on white where it was transparent."""
    frame = ImageOps.exif_transpose(frame) or frame
    frame.load()
    mode = frame.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(frame, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(values.max()), 1.0)
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "P" and "transparency" in frame.info:
        frame = frame.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = frame.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        frame = Image.alpha_composite(paper, rgba)
    rgb = np.asarray(frame.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def _load_pdf(data: bytes, max_pages: int | None) -> list[np.ndarray]:
    import pypdfium2 as pdfium

    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        raise UnreadableImageError(f"corrupt or encrypted PDF file: {exc}") from exc
    try:
        count = len(document)
        if count == 0:
            raise UnreadableImageError("PDF file has no pages")
        if max_pages is not None:
            count = min(count, max_pages)
        pages = []
        for index in range(count):
            page = document[index]
            try:
                width_pt, height_pt = page.get_size()
                scale = PDF_DPI / _PDF_POINTS_PER_INCH
                pixels = width_pt * height_pt * scale * scale
                if pixels > MAX_PIXELS:  # a poster-sized page: render it smaller instead
                    scale *= (MAX_PIXELS / pixels) ** 0.5
                bitmap = page.render(scale=scale)
                try:
                    pages.append(np.ascontiguousarray(np.asarray(bitmap.to_pil().convert("RGB"))))
                finally:
                    bitmap.close()
            except pdfium.PdfiumError as exc:
                reason = f"PDF page {index + 1} cannot be rendered: {exc}"
                raise UnreadableImageError(reason) from exc
            finally:
                page.close()
        return pages
    finally:
        document.close()
