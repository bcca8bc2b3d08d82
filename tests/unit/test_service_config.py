"""Configuration: defaults, YAML, environment precedence, validation, masked output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from service.config import load_settings
from service.ops_cli import run_config_show

YAML = """
http:
  port: 9000
  host: 0.0.0.0
dicom:
  allowed_callers: [{ae_title: MODALITY1, host: 10.0.0.5}, {ae_title: ROUTER}]
pacs:
  - {name: orthanc, ae_title: ORTHANC, host: pacs.local, port: 4242}
ehr:
  base_url: https://ehr.example/fhir
  auth: client_credentials
  token_url: https://ehr.example/token
  client_id: cardioscan
  client_secret: very-secret-value
database_url: postgresql://cs:db-password@db.local/cardioscan
workers: 2
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CARDIOSCAN_"):
            monkeypatch.delenv(key)


def test_embedded_defaults_need_no_setup() -> None:
    s = load_settings()
    assert s.db_url == "sqlite:///var/cardioscan.db"
    assert s.spool_path == Path("var/spool") and s.results_path == Path("var/results")
    assert (s.http.host, s.http.port) == ("127.0.0.1", 8000)
    assert (s.dicom.ae_title, s.dicom.port) == ("CARDIOSCAN", 11112)
    assert s.device == "cpu" and s.fhir_version == "R4"
    assert s.destinations() == []
    assert s.digitizer_target == "pipeline.digitizer:digitize"


def test_yaml_then_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "cardioscan.yaml"
    cfg.write_text(YAML)
    monkeypatch.setenv("CARDIOSCAN_CONFIG", str(cfg))
    monkeypatch.setenv("CARDIOSCAN_HTTP__PORT", "9100")  # nested key, overrides the file
    monkeypatch.setenv("CARDIOSCAN_FHIR_VERSION", "R5")
    s = load_settings()
    assert s.http.port == 9100 and s.http.host == "0.0.0.0"  # merged with the file
    assert s.fhir_version == "R5" and s.workers == 2
    assert [c.ae_title for c in s.dicom.allowed_callers] == ["MODALITY1", "ROUTER"]
    assert s.dicom.allowed_callers[0].host == "10.0.0.5"
    assert [(d.name, d.kind) for d in s.destinations()] == [("orthanc", "pacs"), ("ehr", "ehr")]
    assert s.ehr.client_secret is not None
    assert s.ehr.client_secret.get_secret_value() == "very-secret-value"


def test_lists_come_as_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDIOSCAN_FOLDERS", '[{"name": "archive", "path": "/data/out"}]')
    s = load_settings()
    assert s.destination("archive") is not None
    assert s.destination("archive").kind == "folder"  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [
    {"ehr": {"base_url": "https://x", "auth": "bearer"}},  # no token
    {"ehr": {"base_url": "https://x", "auth": "smart-backend", "token_url": "https://t",
             "client_id": "c"}},  # no key
    {"outputs": ["json", "pdf"]},
    {"pacs": [{"name": "a", "ae_title": "A", "host": "h", "port": 104}],
     "folders": [{"name": "a", "path": "/x"}]},  # duplicate destination name
    {"http": {"port": 70000}},
    {"no_such_key": 1},
])
def test_invalid_configuration_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        load_settings(**bad)


def test_typo_in_yaml_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("http:\n  prot: 80\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(cfg)


def test_config_show_masks_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(YAML)
    assert run_config_show(cfg) == 0
    out = capsys.readouterr().out
    assert "very-secret-value" not in out and "db-password" not in out
    shown = yaml.safe_load(out)
    assert shown["ehr"]["client_secret"] == "**********"
    assert shown["database_url"] == "postgresql://cs:***@db.local/cardioscan"
    assert shown["http"]["port"] == 9000 and shown["spool_dir"] == "var/spool"


def test_config_show_reports_a_bad_file(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert run_config_show(tmp_path / "missing.yaml") == 2
    assert "configuration error" in capsys.readouterr().err
