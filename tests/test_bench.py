"""benchmarks/bench.py --quick runs every section end to end, so the script can't rot. No timing is asserted.
It takes 20-40 s, so a plain `pytest` leaves it out: `pytest -m bench` runs it (CI runs both)."""
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.bench
def test_bench_quick_runs_every_section_and_writes_its_json(pg_server, tmp_path):
    env = {**os.environ, "BENCH_DATABASE_URL": pg_server.base_dsn}  # the session's server: no second one
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    [result] = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert {f["section"] for f in data["figures"]} == {"cold start", "turn overhead", "concurrency", "async path",
                                                         "streaming"}
    machine = data["machine"]
    assert machine["cores"] and machine["cpu"] and machine["postgres"] and machine["python"]
    timed = [f["value"] for f in data["figures"] if isinstance(f["value"], dict)]
    assert timed and all({"median", "p10", "p90", "min", "max", "n"} <= set(v) for v in timed)
    assert "figure" in out.stdout and "machine:" in out.stdout  # the table
