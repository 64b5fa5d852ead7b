"""The side-by-side benchmark's smoke run (``--quick``): it runs, and reports every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_compare.py"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_quick_benchmark_reports_every_figure_and_target(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert set(rows) == {"direct", "squid", "upstreamproxy", "asyncio-floor"}
    assert rows["asyncio-floor"]["cpu_ms_per_tunnel"] >= 0
    assert "reference: a bare asyncio CONNECT proxy" in done.stdout
    rows.pop("asyncio-floor")
    for name in rows:
        assert rows[name]["throughput_mbs"] > 0
        assert rows[name]["ttfb_ms"] > 0 and rows[name]["ttfb_rtt_ms"] > rows[name]["ttfb_ms"]
        assert rows[name]["concurrent_ms"] > 0
    assert rows["squid"]["idle_rss_kib_squid"] > 0
    assert rows["upstreamproxy"]["idle_rss_kib_relay"] > 0
    assert rows["upstreamproxy"]["idle_rss_kib_egress"] > 0
    # The injected RTT shows: every path's TTFB grows by at least one round trip.
    assert all(rows[n]["ttfb_rtt_ms"] >= 20 for n in rows)
    assert "targets (issue 8):" in done.stdout
    assert done.stdout.count("[PASS]") + done.stdout.count("[FAIL]") == 6
    # The namespaces are gone again.
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "upb-" not in namespaces
