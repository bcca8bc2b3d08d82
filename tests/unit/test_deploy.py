"""The Helm chart lints, renders and validates against the Kubernetes schemas.

helm itself does not install here; helm-python-sdk carries Helm's Go SDK, and
kubernetes-validate checks the rendered manifests against the API schemas.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "cardioscan"

helm = pytest.importorskip("helm_python")


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name="demo", namespace="ecg")
    docs: list[dict[str, Any]] = []
    for text in manifests.values():
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_chart_lints_without_errors() -> None:
    result = helm.lint(str(CHART))
    assert result["errors"] == []
    assert not [m for m in result["messages"] if m["severity"] >= 3]


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"postgresql": {"enabled": False}, "externalDatabase": {"existingSecret": "db"},
         "worker": {"gpu": 0, "autoscaling": {"enabled": False}}},
    ],
    ids=["defaults", "external-db-cpu"],
)
def test_rendered_manifests_pass_schema_validation(values: dict[str, Any], tmp_path: Path) -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate not installed")
    docs = _render(values)
    target = tmp_path / "rendered.yaml"
    target.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(target)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _deployment(docs: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    return next(d for d in _by_kind(docs, "Deployment") if d["metadata"]["name"].endswith(suffix))


def test_gpu_worker_hpa_and_pdbs() -> None:
    docs = _render({})
    worker = _deployment(docs, "-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"] == ["worker"]
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")[0]
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "cardioscan_queue_depth"
    assert len(_by_kind(docs, "PodDisruptionBudget")) == 2
    api = _deployment(docs, "-api")
    probes = api["spec"]["template"]["spec"]["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _by_kind(docs, "PersistentVolumeClaim")[0]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_cpu_only_worker_requests_no_gpu() -> None:
    docs = _render({"worker": {"gpu": 0}})
    worker = _deployment(docs, "-worker")
    resources = worker["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {})


def test_external_database_requires_a_secret() -> None:
    with pytest.raises(Exception, match=r"externalDatabase\.existingSecret"):
        _render({"postgresql": {"enabled": False}})


def test_compose_and_dockerfile() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    assert {"cardioscan", "worker", "postgres", "orthanc"} <= set(compose["services"])
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "nvidia/cuda" in dockerfile
    user_lines = [ln for ln in dockerfile.splitlines() if ln.startswith("USER ")]
    assert user_lines and not user_lines[-1].split()[1].startswith("0")


def test_example_config_and_chart_config_load_as_settings(tmp_path: Path) -> None:
    from service.config import load_settings

    example = load_settings(ROOT / "deploy" / "config.example.yaml")
    assert example.pacs[0].ae_title == "ORTHANC"
    docs = _render({"config": {"pacs": [{"name": "pacs", "ae_title": "PACS", "host": "pacs",
                                         "port": 104}]}})
    configmap = _by_kind(docs, "ConfigMap")[0]
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    settings = load_settings(path)
    assert settings.dicom.ae_title == "CARDIOSCAN"
    assert settings.pacs[0].port == 104
