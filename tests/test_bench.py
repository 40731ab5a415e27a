"""Every benchmark runs end to end at a toy size and prints its figures.

The figures themselves are measured by running the scripts, never here; these runs only
keep the scripts working as the code they measure changes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# script -> toy-size arguments, and a line its figures must include
RUNS = {
    "cycle": (
        ["--requests", "300", "--runs", "1"],
        "| 300 | notifier once, baseline |",
    ),
    "compare": ([str(ROOT), "--requests", "300", "--rounds", "1"], "| wall |"),
    "sweep": (
        [
            *("--requests", "400", "--days", "2", "--old", "4", "--recent", "4"),
            *("--interval", "0.2", "--period", "3", "--orders", "newest-first"),
        ],
        "| newest-first | ",
    ),
    "latency": (
        ["--transitions", "5", "--duration", "3", "--requests", "50", "--poll-interval", "0.5"],
        "status change → webhook arrival",
    ),
    "list_requests": (["--requests", "300", "--runs", "1"], "client_listing"),
    "render": (["--events", "200", "--runs", "1"], "webhook default (render + sign)"),
    "state_memory": (["--requests", "500"], "used_memory"),
    "delivery": (["--deliveries", "100", "--runs", "1"], "full path"),
    "digest": (["--requests", "500", "--batch", "50", "--rounds", "1"], "| settle step"),
    "hostile": (
        ["--requests", "20", "--seconds", "1", "--case", "deep-json"],
        "| deep-json: JSON nested 100,000 levels deep |",
    ),
}


@pytest.mark.parametrize("script", sorted(RUNS))
def test_the_benchmark_runs_and_prints_its_figures(script: str) -> None:
    arguments, expected = RUNS[script]
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert expected in done.stdout, done.stdout
