"""Operator commands through the real CLI: status, retry, config show."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from service_support import REPO, free_port, settings_env
from typer.testing import CliRunner

from adapters.source import SourceMeta
from service.cli import app
from service.config import load_settings
from service.store import JobStore

UID = "1.2.826.0.1.3680043.8.498.{}"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"COLUMNS": "200", "CARDIOSCAN_DATA_DIR": str(tmp_path / "var"),
            "CARDIOSCAN_SPOOL_MIN_FREE_BYTES": "0",
            "CARDIOSCAN_MAX_ATTEMPTS": "1", "CARDIOSCAN_DELIVERY_MAX_ATTEMPTS": "1",
            "CARDIOSCAN_FOLDERS": f'[{{"name": "archive", "path": "{tmp_path / "out"}"}}]'}


@pytest.fixture
def store(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> JobStore:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return JobStore(load_settings())


def src(n: int) -> SourceMeta:
    return SourceMeta(route="dicom", source_id=UID.format(n), media_type="application/dicom")


def test_status_shows_the_queue_and_dead_letters(store: JobStore, env: dict[str, str],
                                                 tmp_path: Path) -> None:
    dead = store.accept(b"1", src(1)).job_id
    [claim] = store.claim_jobs("w", 1, 30)
    store.fail_job(claim, "digitizer process died (exit code -9)", permanent=False)
    done = store.accept(b"2", src(2)).job_id
    [claim] = store.claim_jobs("w", 1, 30)
    store.complete_job(claim, staging_dir=None, outputs=[], pages=1, engine="x")
    [task] = store.claim_deliveries("w", 1, 30)
    store.fail_delivery(task, "PACS refused: 0xA700", permanent=False)
    store.accept(b"3", src(3))

    result = CliRunner().invoke(app, ["status"], env=env)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Jobs" in out and "Deliveries" in out and "Dead letters" in out
    assert dead in out and "digitizer process died" in out
    assert done in out and "delivery to archive" in out and "PACS refused" in out

    result = CliRunner().invoke(app, ["retry", "--all-dead"], env=env)
    assert result.exit_code == 0
    assert "re-queued 1 dead jobs and 1 dead deliveries" in result.output
    assert store.get_job(dead).state == "queued"  # type: ignore[union-attr]
    assert store.get_job(done).deliveries[0].state == "pending"  # type: ignore[union-attr]
    assert [e.actor for e in store.audit_events(job_id=dead, action="retried")] == [
        "operator:cli"]


def test_retry_one_job_and_bad_uses(store: JobStore, env: dict[str, str]) -> None:
    job = store.accept(b"4", src(4)).job_id
    runner = CliRunner()
    result = runner.invoke(app, ["retry", job], env=env)
    assert result.exit_code == 1 and "nothing to retry" in result.output
    [claim] = store.claim_jobs("w", 1, 30)
    store.fail_job(claim, "no ECG grid found", permanent=True)
    result = runner.invoke(app, ["retry", job], env=env)
    assert result.exit_code == 0 and f"job {job}: queued" in result.output
    assert runner.invoke(app, ["retry", "no-such-job"], env=env).exit_code == 1
    assert runner.invoke(app, ["retry"], env=env).exit_code == 2
    assert runner.invoke(app, ["retry", job, "--all-dead"], env=env).exit_code == 2


def test_config_show_through_the_cli(env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["config", "show"],
                                env={**env, "CARDIOSCAN_EHR__BASE_URL": "https://ehr/fhir",
                                     "CARDIOSCAN_EHR__AUTH": "bearer",
                                     "CARDIOSCAN_EHR__TOKEN": "tok-123"})
    assert result.exit_code == 0
    assert "tok-123" not in result.output and "token: '**********'" in result.output


def test_status_and_retry_where_nothing_was_ever_received(tmp_path: Path) -> None:
    env = {"COLUMNS": "200", "CARDIOSCAN_DATA_DIR": str(tmp_path / "var")}
    result = CliRunner().invoke(app, ["status"], env=env)
    assert result.exit_code == 0, result.output
    assert "no job store at" in result.output and "--config" in result.output
    result = CliRunner().invoke(app, ["retry", "--all-dead"], env=env)
    assert result.exit_code == 1 and "no job store at" in result.output
    assert not (tmp_path / "var").exists()  # looking created nothing


def test_status_when_the_database_is_down_says_so(tmp_path: Path) -> None:
    env = {"CARDIOSCAN_DATA_DIR": str(tmp_path / "var"),
           "CARDIOSCAN_DATABASE_URL": "postgresql+psycopg://cs:db-secret@127.0.0.1:1/cardioscan"}
    result = CliRunner().invoke(app, ["status"], env=env)
    assert result.exit_code == 1
    assert "cannot open the job store (postgresql+psycopg://cs:***@127.0.0.1:1/cardioscan)" \
        in result.output
    assert "db-secret" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("http:\n  port: 8000\n   host: x\n", "line 3, column 8 is not valid YAML"),
    ("- http\n- dicom\n", "must hold a mapping of settings"),
    ("http:\n  prot: 80\n", "http.prot: unknown setting; did you mean 'port'?"),
    ("dicom:\n  allowed_callers: [{ae_title: A, hots: h}]\n",
     "dicom.allowed_callers.0.hots: unknown setting; did you mean 'host'?"),
    ("workers: two\n", "workers (CARDIOSCAN_WORKERS): Input should be a valid integer"),
    ("http:\n  api_keys: [{name: lab, key: sesame-open}]\n",
     "http.api_keys.0 (CARDIOSCAN_HTTP__API_KEYS): API key 'lab' is shorter than 16"),
])
def test_bad_configuration_files_get_one_clear_message(tmp_path: Path, yaml_text: str,
                                                       expected: str) -> None:
    cfg = tmp_path / "cardioscan.yaml"
    cfg.write_text(yaml_text)
    for command in (["config", "show"], ["status"], ["serve"], ["worker"]):
        result = CliRunner().invoke(app, [*command, "--config", str(cfg)])
        assert result.exit_code == 2, (command, result.output)
        assert result.output.startswith("cardioscan: configuration error: ")
        assert expected in result.output, result.output
        assert "Traceback" not in result.output and "pydantic.dev" not in result.output
        assert "sesame-open" not in result.output  # a value may be a secret: never echoed


def test_a_list_variable_that_is_not_json_is_named() -> None:
    result = CliRunner().invoke(app, ["config", "show"],
                                env={"CARDIOSCAN_PACS": '[{"name": "orthanc"'})
    assert result.exit_code == 2
    assert 'field "pacs"' in result.output and "Expecting" in result.output


@pytest.mark.parametrize("taken", ["http", "dicom"])
def test_serve_says_which_port_is_taken_and_starts_nothing(tmp_path: Path, taken: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {"http": free_port(), "dicom": free_port(), taken: busy.getsockname()[1]}
        env = settings_env(tmp_path / "var", workers=1, log_json="false")
        env.update({"CARDIOSCAN_HTTP__PORT": str(ports["http"]),
                    "CARDIOSCAN_DICOM__PORT": str(ports["dicom"])})
        proc = subprocess.run([sys.executable, "-m", "service.cli", "serve"], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    key = {"http": "CARDIOSCAN_HTTP__PORT", "dicom": "CARDIOSCAN_DICOM__PORT"}[taken]
    assert f"{taken.upper()} port {ports[taken]} on 127.0.0.1 is already in use" in proc.stderr
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr and "worker process 0 started" not in proc.stderr
