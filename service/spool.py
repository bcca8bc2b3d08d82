"""The spool: received objects on disk, written durably before anyone is told "stored".

A write lands in ``<spool>/tmp/``, is fsync'ed, then renamed to
``<spool>/<yyyy>/<mm>/<dd>/<name>`` and the directory fsync'ed, so after a crash a file
is either complete at its final name or absent. The spool may be shared by several
nodes (NFS/PVC); names are unique ids, so nodes never collide.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from service.errors import StoreError, StoreFullError

_CHUNK = 1024 * 1024
TMP_DIR = "tmp"

MEDIA_SUFFIX = {
    "application/dicom": ".dcm",
    "application/pdf": ".pdf",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/tiff": ".tif",
    "image/bmp": ".bmp",
    "image/webp": ".webp",
}


@dataclass(frozen=True)
class SpooledFile:
    relpath: str
    """Relative to the spool root; what the database stores."""
    sha256: str
    size: int


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """Create ``path`` and fsync each parent whose entries changed."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def _store_error(exc: OSError, what: str) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFullError(f"out of disk space while writing {what}")
    return StoreError(f"could not write {what}: {exc.strerror or exc}")


class Spool:
    """Durable file storage for received objects."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes

    def ensure(self) -> None:
        _makedirs_durable(self.root / TMP_DIR)

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_free(self, needed: int = 0) -> None:
        """Raise :class:`StoreFullError` when writing ``needed`` bytes would cross the floor."""
        if self.free_bytes() - needed < self.min_free_bytes:
            raise StoreFullError(
                f"spool has less than {self.min_free_bytes} bytes free; refusing new objects"
            )

    def tempfile(self) -> Path:
        """A fresh path under ``tmp/`` for a writer that streams a large object to disk
        (then hands it to :meth:`adopt` through ``JobStore.accept_path``)."""
        self.ensure()
        self.check_free()
        return self.root / TMP_DIR / f"{uuid.uuid4().hex}.part"

    def _final_relpath(self, name: str, media_type: str) -> str:
        day = datetime.now(UTC)
        suffix = MEDIA_SUFFIX.get(media_type.split(";")[0].strip().lower(), ".bin")
        return f"{day:%Y/%m/%d}/{name}{suffix}"

    def write(self, data: bytes, name: str, media_type: str) -> SpooledFile:
        """Store ``data`` durably as ``name``; fsync'ed file and directories."""
        self.ensure()
        self.check_free(len(data))
        tmp = self.root / TMP_DIR / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _store_error(exc, "the spool file") from exc
        return self._install(tmp, name, media_type, hashlib.sha256(data).hexdigest(), len(data))

    def adopt(self, temp_path: Path, name: str, media_type: str) -> SpooledFile:
        """Make a fully written temp file durable and move it to its final name."""
        digest = hashlib.sha256()
        size = 0
        try:
            with open(temp_path, "rb+") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                os.fsync(f.fileno())
        except OSError as exc:
            raise _store_error(exc, "the spool file") from exc
        if temp_path.parent.resolve() != (self.root / TMP_DIR).resolve():
            # Not our tmp dir: copy in first so the final rename stays on one file system.
            self.ensure()
            tmp = self.root / TMP_DIR / f"{uuid.uuid4().hex}.part"
            try:
                shutil.copyfile(temp_path, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise _store_error(exc, "the spool file") from exc
            temp_path.unlink(missing_ok=True)
            temp_path = tmp
        return self._install(temp_path, name, media_type, digest.hexdigest(), size)

    def _install(self, tmp: Path, name: str, media_type: str, sha: str, size: int) -> SpooledFile:
        rel = self._final_relpath(name, media_type)
        final = self.root / rel
        try:
            _makedirs_durable(final.parent)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            fsync_dir(tmp.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _store_error(exc, "the spool file") from exc
        return SpooledFile(relpath=rel, sha256=sha, size=size)

    def remove(self, relpath: str) -> int:
        """Delete a spooled file; returns the bytes freed (0 if already gone)."""
        p = self.root / relpath
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        return size

    def read(self, relpath: str) -> bytes:
        return (self.root / relpath).read_bytes()
