"""Metrics summed over a node's processes, GPU figures, and the JSON log format."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from service.observability import GpuCollector, JsonFormatter, log_context

REPO = Path(__file__).resolve().parents[2]


def test_counters_and_histograms_are_summed_over_processes(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import multiprocessing, os, sys
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]

        def work(n):
            from service import observability as obs
            obs.RECEIVED.labels("dicom").inc(n)
            obs.DIGITIZATION_SECONDS.labels("traces").observe(0.5)

        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=work, args=(n,)) for n in (2, 3)]
            for p in procs: p.start()
            for p in procs: p.join()
            from service.observability import render_metrics
            print(render_metrics(None).decode())
    """)
    path = tmp_path / "node.py"
    path.write_text(script)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    out = subprocess.run([sys.executable, str(path), str(metrics_dir)], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert 'cardioscan_received_total{route="dicom"} 5.0' in out
    assert 'cardioscan_digitization_seconds_count{stage="traces"} 2.0' in out


def test_gpu_use_is_read_from_nvidia_smi(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, 87, 30000, 81559'\necho '1, 3, 500, 81559'\n")
    fake.chmod(0o755)
    collector = GpuCollector()
    collector.binary = str(fake)
    samples = {(s.name, s.labels["gpu"]): s.value
               for family in collector.collect() for s in family.samples}
    assert samples[("cardioscan_gpu_utilization_ratio", "0")] == 0.87
    assert samples[("cardioscan_gpu_memory_used_bytes", "1")] == 500 * 1024 * 1024
    assert samples[("cardioscan_gpu_memory_total_bytes", "0")] == 81559 * 1024 * 1024
    collector.binary = None
    assert list(collector.collect()) == []


def test_json_log_lines_carry_only_allowed_fields() -> None:
    fmt = JsonFormatter()
    record = logging.LogRecord("service.x", logging.INFO, __file__, 1, "job %s", ("done",), None)
    record.job_id = "abc"
    record.patient_name = "Doe^Jane"  # not on the allow-list: never written
    line = json.loads(fmt.format(record))
    assert line["msg"] == "job done" and line["job_id"] == "abc" and line["pid"] == os.getpid()
    assert "patient_name" not in line and "Doe^Jane" not in json.dumps(line)


def test_log_context_nests() -> None:
    from service.observability import _context

    with log_context(job_id="j1", source_uid="1.2.3"):
        with log_context(delivery_id="d1"):
            assert _context.get() == {"job_id": "j1", "source_uid": "1.2.3", "delivery_id": "d1"}
        assert _context.get() == {"job_id": "j1", "source_uid": "1.2.3"}
    assert not _context.get()
