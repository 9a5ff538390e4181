"""How far the console's page lags the control server (target <= 1 s).

    python benchmarks/console_lag.py [--runs 3] [--out benchmarks/results]

Runs the approve-mode browser test (Debian chromium, 1600x900, a virtual IOC, `tbsac
serve`, `tbsac console`) `--runs` times. Each run measures, against the session's own
record of its proposals: Start -> first proposal and Approve -> next proposal on the
server and on the page, and the page's lag behind the server. Writes
``console_lag.json`` (every run and the medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/ui/test_console_browser.py::test_approve_mode_orbit_correction_through_the_console"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as artifacts:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST], cwd=ROOT,
                                  env={**os.environ, "TBSAC_ARTIFACTS": artifacts}, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"run {i + 1}: the browser test failed:\n{proc.stdout[-3000:]}")
            runs.append(json.loads((Path(artifacts) / "console-lag.json").read_text()))
        print(f"run {i + 1}: {json.dumps(runs[-1])}", flush=True)
    medians = {phase: {key: statistics.median(r[phase][key] for r in runs) for key in runs[0][phase]} for phase in runs[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "console_lag.json").write_text(json.dumps({"runs": runs, "median": medians}, indent=1))
    for phase, values in medians.items():
        print(f"{phase}: server {values['server_s']:.2f} s, page {values['page_s']:.2f} s, page lag {values['page_lag_s']:.2f} s "
              f"(target <= 1 s: {'met' if values['page_lag_s'] <= 1.0 else 'NOT met'})")


if __name__ == "__main__":
    main()
