"""The web viewer: one static page that uploads a picture and shows what was read.

Served at ``/`` by the HTTP app; it talks only to the public REST API (``/api/v1``), so
anything it shows an integration engineer can script the same way.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    """The viewer's page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def static_files() -> StaticFiles:
    """Mount at ``/static``: the viewer's script and style sheet."""
    return StaticFiles(directory=STATIC_DIR)
