"""A finished job's result files, written by the adapters into ``results_dir/<job_id>/``.

==============  =====================  =================================================
kind            file                   written by
==============  =====================  =================================================
json            result.json            adapters.result_json.to_response (the seed's shape)
wfdb            record.hea, .dat       adapters.wfdb_io.write_record
csv             record.csv             adapters.wfdb_io.write_csv
dicom           ecg.dcm                adapters.dicom.build_ecg_waveform
fhir            fhir-bundle.json       adapters.fhir.build_result_bundle
overlay         overlay.png            the digitizer's QA overlay picture
==============  =====================  =================================================

Which kinds are written is ``Settings.outputs``. An adapter module that is not installed
is skipped with a log line (the list of produced kinds is stored with the job); any other
error fails the attempt, so a destination never receives a half-made result. Pages after
the first digitized one go to ``page-<n>/`` with a source identity suffixed ``/page-<n>``,
so their DICOM UIDs and FHIR identifiers stay distinct and stable.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.source import SourceMeta
from pipeline.result import Digitization
from service.config import Settings

log = logging.getLogger(__name__)

WFDB_STEM = "record"
OUTPUT_FILES: dict[str, str] = {
    "json": "result.json",
    "dicom": "ecg.dcm",
    "fhir": "fhir-bundle.json",
    "csv": "record.csv",
    "overlay": "overlay.png",
    "hea": f"{WFDB_STEM}.hea",
    "dat": f"{WFDB_STEM}.dat",
}
"""Output kind -> file name in a job's result directory (``wfdb`` is ``hea`` + ``dat``)."""


class AdapterMissingError(ImportError):
    """An adapter this output needs is not installed (yet)."""


def adapter(name: str, *modules: str) -> Callable[..., Any]:
    """The function ``name`` from the first of ``modules`` that defines it."""
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # the adapter module itself is missing, not one of its imports
            raise
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    raise AdapterMissingError(f"{name} not available (looked in {', '.join(modules)})")


def page_source(source: SourceMeta, page: int) -> SourceMeta:
    """The identity a page's outputs derive their UIDs from; page 1 keeps the source's."""
    if page == 1:
        return source
    return dataclasses.replace(source, source_id=f"{source.source_id}/page-{page}")


def page_dir(result_dir: Path, page: int, first_page: int) -> Path:
    return result_dir if page == first_page else result_dir / f"page-{page}"


def _write_json(doc: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, allow_nan=False, separators=(",", ":")))


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def build_outputs(job_id: str, dig: Digitization, source: SourceMeta, settings: Settings,
                  out_dir: Path | None = None) -> list[str]:
    """Write the configured outputs of one digitized page into ``out_dir`` (default
    ``results_dir/<job_id>``); returns the kinds produced."""
    out = out_dir or settings.results_path / job_id
    out.mkdir(parents=True, exist_ok=True)
    writers: dict[str, Callable[[], None]] = {
        "json": lambda: _write_json(
            adapter("to_response", "adapters.result_json")(dig, job_id=job_id,
                                                            include_images=True),
            out / OUTPUT_FILES["json"]),
        "wfdb": lambda: adapter("write_record", "adapters.wfdb_io")(dig, out, WFDB_STEM),
        "csv": lambda: adapter("write_csv", "adapters.wfdb_io")(dig, out / OUTPUT_FILES["csv"]),
        "dicom": lambda: _write_dicom(dig, source, out / OUTPUT_FILES["dicom"]),
        "fhir": lambda: _write_json(
            adapter("build_result_bundle", "adapters.fhir", "adapters.fhir.results")(
                dig, source, version=settings.fhir_version, job_id=job_id,
                base_url=settings.http.base_url + "/fhir"),
            out / OUTPUT_FILES["fhir"]),
        "overlay": lambda: _write_overlay(dig, out / OUTPUT_FILES["overlay"]),
    }
    produced: list[str] = []
    skipped: list[str] = []
    for kind in settings.outputs:
        try:
            writers[kind]()
        except AdapterMissingError as exc:
            skipped.append(kind)
            log.warning("output skipped: %s", exc, extra={"job_id": job_id})
            continue
        except _NoOverlayError:
            skipped.append(kind)
            continue
        produced.append(kind)
    _fsync_tree(out)
    log.info("outputs written: %s%s", ",".join(produced) or "none",
             f" (skipped {','.join(skipped)})" if skipped else "", extra={"job_id": job_id})
    return produced


def _write_dicom(dig: Digitization, source: SourceMeta, path: Path) -> None:
    build = adapter("build_ecg_waveform", "adapters.dicom", "adapters.dicom.waveform")
    ds = build(dig, source)
    ds.save_as(path, enforce_file_format=True)


class _NoOverlayError(Exception):
    """The digitizer returned no overlay picture (QA off)."""


def _write_overlay(dig: Digitization, path: Path) -> None:
    from PIL import Image

    picture = dig.qa_images.get("overlay")
    if picture is None:
        raise _NoOverlayError
    Image.fromarray(picture).save(path, format="PNG")
