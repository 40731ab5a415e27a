"""Peak memory of `notifier run` under each hostile API response, against a normal one.

    python bench/hostile.py [--requests 100] [--seconds 12] [--case NAME ...]

For each case the script starts the API simulator in a process of its own, answering
every list call with that case's fault (see `FaultKind`), and a `notifier run` with the
in-memory store against it. After `--seconds` it reads the run's peak resident memory
(VmHWM of /proc/PID/status, Linux) and its completed and failed poll cycles (from
/metrics), then sends SIGTERM and times the exit. The first case, `normal`, is the same
account with ordinary items: every other peak is also given as a ratio to it.

The contract: whatever the API answers, the process keeps running, answers SIGTERM
within 9 s, and its memory stays bounded; the target for a 20 MiB response is a peak of
at most 200 MB.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from common import (
    free_port,
    markdown_table,
    notifier_command,
    notifier_env,
    simulator_process,
    stop,
    wait_until,
)

KEY = "bench-hostile-key-0123456789"
TARGET_MB = 200  # peak RSS under the 20 MiB response
MiB = 1024 * 1024


def _created(day: str) -> tuple[str, ...]:
    """The fault of an account whose fourth listed request was created on `day`."""
    field = ("--fault-field", "created_at", "--fault-value", f"{day}T00:00:00Z")
    return ("--fault", "malformed-item", "--fault-index", "3", *field)


@dataclass(frozen=True)
class Case:
    """One hostile answer: its name, what it is, and the simulator's fault options."""

    name: str
    what: str
    fault: tuple[str, ...]


CASES = (
    Case("normal", "ordinary items (the baseline of the ratios)", ()),
    Case(
        "20mib",
        "every page of 100 is 20 MiB (200 kB error_message per item)",
        ("--fault", "bloated", "--fault-size", str(200_000)),
    ),
    Case(
        "1mb-items",
        "100 items of 1 MB each: a 100 MB page",
        ("--fault", "bloated", "--fault-size", str(1_000_000)),
    ),
    Case(
        "deep-json",
        "JSON nested 100,000 levels deep",
        ("--fault", "deep-json", "--fault-size", "100000"),
    ),
    Case(
        "huge-total",
        "pagination.total = 10^12",
        ("--fault", "huge-total", "--fault-size", str(10**12)),
    ),
    Case("zero-time", "an item created 0001-01-01 (Go's zero time)", _created("0001-01-01")),
    Case("far-future", "an item created in year 9999", _created("9999-12-31")),
)


@dataclass(frozen=True)
class Measured:
    """What one case did to `notifier run`."""

    peak_mb: float
    completed: int
    failed: int
    exit_code: int
    exit_s: float


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of a process so far, in MB (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmHWM in /proc: this benchmark needs Linux")


def cycles(port: int) -> tuple[int, int]:
    """Completed and failed poll cycles, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    counts = {"completed": 0, "failed": 0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "notifier_poll_cycles_total":
                counts[sample.labels["outcome"]] = int(sample.value)
    return counts["completed"], counts["failed"]


def answers(port: int) -> bool:
    """Whether /healthz answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
            return True
    except OSError:
        return False


def measure(case: Case, requests: int, seconds: float) -> Measured:
    """Run `notifier run` against the case for `seconds`; what it did."""
    with simulator_process(requests, KEY, options=case.fault) as simulator:
        port = free_port()
        env = notifier_env(
            api_url=simulator.url,
            api_key=KEY,
            webhook_url="http://127.0.0.1:9/hook",
            http_host="127.0.0.1",
            http_port=str(port),
            poll_interval="1",
        )
        run = subprocess.Popen(
            notifier_command("run"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_until(run, lambda: answers(port), "notifier run")
            time.sleep(seconds)
            if run.poll() is not None:
                raise RuntimeError(f"notifier run exited with {run.returncode} under {case.name}")
            peak, (completed, failed) = peak_rss_mb(run.pid), cycles(port)
            signalled = time.monotonic()
            run.send_signal(signal.SIGTERM)
            code = run.wait(timeout=15)
            return Measured(peak, completed, failed, code, time.monotonic() - signalled)
        finally:
            stop(run)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="requests in the account")
    parser.add_argument("--seconds", type=float, default=12, help="time under each case")
    parser.add_argument("--case", action="append", choices=[c.name for c in CASES])
    args = parser.parse_args(argv)
    chosen = [c for c in CASES if c.name == "normal" or not args.case or c.name in args.case]
    results = {case.name: measure(case, args.requests, args.seconds) for case in chosen}
    normal = results["normal"].peak_mb
    rows = [
        (
            f"{case.name}: {case.what}",
            f"{results[case.name].peak_mb:.0f}",
            f"{results[case.name].peak_mb / normal:.2f}×",
            results[case.name].completed,
            results[case.name].failed,
            results[case.name].exit_code,
            f"{results[case.name].exit_s:.2f}",
        )
        for case in chosen
    ]
    print(
        f"notifier run, {args.requests} requests, {args.seconds:g} s under each answer "
        f"(target: peak ≤ {TARGET_MB} MB under the 20 MiB response)\n"
    )
    headers = ("answer", "peak RSS MB", "× normal", "cycles ok", "cycles failed", "exit", "exit s")
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
