"""Time a whole `notifier once` cycle against bare aiohttp listings, and measure its footprint.

    python bench/cycle.py [--requests 50000 100000] [--runs 3] [--page-size 100] [--seed 1]
                          [--api-rate-limit 1000000]

Every contender is a process of its own, timed from its spawn to its reaping (`os.wait4`,
which also gives that child's own user+sys CPU seconds and peak RSS):

- bare, sequential: `python bench/bare_listing.py URL --concurrency 1`, aiohttp fetching and
  decoding one page after another;
- bare, 4 in flight: the same with `--concurrency 4`, as many as NOTIFIER_LIST_CONCURRENCY's
  default;
- notifier once, baseline: `notifier once` on an empty namespace (a fresh
  NOTIFIER_KEY_PREFIX every run), with NOTIFIER_API_URL, NOTIFIER_API_KEY,
  NOTIFIER_REDIS_URL, NOTIFIER_PAGE_SIZE (`--page-size`), a NOTIFIER_WEBHOOK_URL on
  127.0.0.1 (a baseline queues nothing, so nothing is sent) and NOTIFIER_API_RATE_LIMIT
  (`--api-rate-limit`, by default high enough never to wait: the ceiling on API calls a
  second is a setting, not a cost, and the bare listings have none; a notifier without
  the setting ignores it);
- notifier once, steady state: `notifier once` again on the same namespace, where nothing
  changed (the table says how many requests it listed: a notifier that lists only what can
  still change lists fewer than the account holds).

The script starts its own redis-server (a free port on 127.0.0.1, persistence off) and the
simulator in its own process (`python -m notifier.simulator --tick 0 --seed S`, newest
first) once per `--requests` size, and a second simulator with an empty account
(`--requests 0`). Fixed costs (interpreter start-up, imports, the first connection, and
for the notifier the key check, lease, epoch and delivery pass) are the same commands
against the empty account; "net" is the best time against the account less the best
against the empty one. One untimed warm-up of every command against the empty account
(byte code, Redis script cache) and one bare listing of each account (the simulator sorts
its listing once) come first; then `--runs` rounds that interleave every command on both
accounts, so drift hits all alike. Times and CPU are the best of the rounds; peak RSS and
Redis figures the worst.

Alongside each command's own CPU, the CPU the simulator and redis-server used meanwhile
(/proc, so Linux only): the three share the machine's cores, and their sum divided by the
cores ("CPU floor") is the least wall time any schedule could reach.

Footprint: CPU seconds per 1,000 requests per cycle, whole and net of the empty account's;
peak RSS (ru_maxrss) of the notifier process (target ≤ 150 MB at 100,000 requests);
the time Redis spent in the cycle's commands (INFO commandstats, mostly the apply script);
and Redis bytes per tracked request: `used_memory` (less the connected clients' buffers)
after a baseline cycle less before it, divided by the request count, for the whole
namespace the cycle leaves (target ≤ 120 B). The server is flushed before each baseline on
the account, so every round starts from the same empty server (the script cache stays),
and latency tracking is off (Redis 7 allocates a histogram per command on its first call).
bench/state_memory.py measures the state hashes alone.

The notifier measured is the one `import notifier` finds, printed first: to measure an
earlier commit, export it (`git archive COMMIT notifier templates | tar -x -C DIR`) and run
with PYTHONPATH=DIR; the children inherit it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

import redis

from common import (
    BACKGROUND_WARNING,
    SimulatorProcess,
    cpu_seconds,
    machine_cpu_seconds,
    markdown_table,
    notifier_command,
    notifier_env,
    notifier_source,
    redis_server,
    simulator_process,
)

KEY = "bench-key"
WEBHOOK_URL = "http://127.0.0.1:9/hook"  # the discard port: nothing is ever sent to it
UNTHROTTLED = 1_000_000  # API calls a second: a ceiling no listing here comes near
BARE_LISTING = Path(__file__).with_name("bare_listing.py")
CONCURRENCY = 4  # NOTIFIER_LIST_CONCURRENCY's default
TARGET_VS_SEQUENTIAL = 1.0  # net notifier cycle / net bare sequential listing
TARGET_VS_CONCURRENT = 1.2  # net notifier cycle / net bare listing with 4 in flight
TARGET_RSS_MB = 150.0  # peak RSS of `notifier once`, at 100,000 requests
TARGET_BYTES = 120.0  # Redis bytes per tracked request, at 100,000 requests
TARGET_AT = 100_000
CYCLE_LINE = re.compile(r"^cycle: (baseline, )?(\d+) requests listed, (\d+) events queued$", re.M)
PREFIXES = itertools.count()  # numbers each baseline: its own key prefix

# The commands, in the order each round runs them.
SEQUENTIAL, CONCURRENT = "bare aiohttp, sequential", f"bare aiohttp, {CONCURRENCY} in flight"
BASELINE, STEADY = "notifier once, baseline", "notifier once, steady state"
COMMANDS = (SEQUENTIAL, CONCURRENT, BASELINE, STEADY)


@dataclass(frozen=True)
class Child:
    """One finished child process: what it cost and what it printed."""

    wall_s: float
    cpu_s: float  # user + sys of this child alone
    peak_rss_mb: float
    output: str
    simulator_cpu_s: float  # user + sys of the simulator meanwhile
    redis_cpu_s: float  # user + sys of redis-server meanwhile
    other_cpu_s: float  # CPU every other process of the machine used meanwhile


@dataclass(frozen=True)
class CycleFigures:
    """What a `notifier once` listed, and what it cost Redis: memory it left, time spent in
    commands."""

    listed: int
    bytes_added: int
    command_s: float


def check_bare(child: Child, requests: int) -> Child:
    seen = int(child.output.split()[-1])
    if seen != requests:
        raise RuntimeError(f"a bare listing saw {seen} requests, expected {requests}")
    return child


def check_cycle(child: Child, requests: int, baseline: bool) -> int:
    """How many requests the cycle listed: all of them for a baseline, at most all of them
    after it (a cycle may list only the part of the account that can still change)."""
    match = CYCLE_LINE.search(child.output)
    if match is None:
        raise RuntimeError(f"notifier once printed no cycle line:\n{child.output}")
    listed = int(match[2])
    if bool(match[1]) != baseline or int(match[3]) or listed > requests:
        raise RuntimeError(f"expected a cycle with baseline={baseline}, 0 events: {match[0]}")
    if baseline and listed != requests:
        raise RuntimeError(f"the baseline listed {listed} requests, expected {requests}")
    return listed


class Rig:
    """The redis-server and a way to run every command against one account."""

    def __init__(self, redis_port: int, page_size: int, api_rate_limit: float) -> None:
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.api_rate_limit = api_rate_limit
        self.client = redis.Redis(port=redis_port, decode_responses=True)
        self.redis_pid = int(self.client.info("server")["process_id"])
        self.page_size = page_size
        # No ~25 KB histogram per command on its first call; an older Redis has none.
        with suppress(redis.ResponseError):
            self.client.config_set("latency-tracking", "no")

    def run(self, argv: list[str], env: dict[str, str], simulator: SimulatorProcess) -> Child:
        """Run `argv` to its end; raise with its output if it exits with anything but 0."""
        simulator_before, redis_before = cpu_seconds(simulator.pid), cpu_seconds(self.redis_pid)
        machine_before = machine_cpu_seconds()
        started = time.perf_counter()
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None  # noqa: S101 - stdout=PIPE
        with process.stdout:
            output = process.stdout.read().decode(errors="replace")
        # wait4 rather than wait(): it reports this child's own CPU time and peak RSS.
        _, status, usage = os.wait4(process.pid, 0)
        wall_s = time.perf_counter() - started
        machine_s = machine_cpu_seconds() - machine_before
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}:\n{output}")
        cpu_s = usage.ru_utime + usage.ru_stime
        simulator_s = cpu_seconds(simulator.pid) - simulator_before
        redis_s = cpu_seconds(self.redis_pid) - redis_before
        return Child(
            wall_s=wall_s,
            cpu_s=cpu_s,
            peak_rss_mb=usage.ru_maxrss * 1024 / 1e6,
            output=output,
            simulator_cpu_s=simulator_s,
            redis_cpu_s=redis_s,
            other_cpu_s=max(0.0, machine_s - cpu_s - simulator_s - redis_s),
        )

    def bare(self, simulator: SimulatorProcess, requests: int, concurrency: int) -> Child:
        argv = [sys.executable, str(BARE_LISTING), simulator.url, "--key", KEY]
        argv += ["--page-size", str(self.page_size), "--concurrency", str(concurrency)]
        return check_bare(self.run(argv, notifier_env(), simulator), requests)

    def notifier_env(self, api_url: str) -> dict[str, str]:
        """The settings of a `notifier once` on a namespace of its own."""
        return notifier_env(
            api_url=api_url,
            api_key=KEY,
            redis_url=self.redis_url,
            key_prefix=f"bench-cycle-{next(PREFIXES):04d}",
            webhook_url=WEBHOOK_URL,
            page_size=str(self.page_size),
            api_rate_limit=str(self.api_rate_limit),
        )

    def once(
        self, simulator: SimulatorProcess, env: dict[str, str], requests: int, baseline: bool
    ) -> tuple[Child, CycleFigures]:
        """`notifier once` in `env`, checked, and what it cost Redis."""
        before_bytes, before_s = self._used_memory(), self._command_seconds()
        child = self.run(notifier_command("once"), env, simulator)
        listed = check_cycle(child, requests, baseline)
        self._wait_for_clients_to_leave()
        figures = CycleFigures(
            listed, self._used_memory() - before_bytes, self._command_seconds() - before_s
        )
        return child, figures

    def round(
        self, simulator: SimulatorProcess, requests: int
    ) -> dict[str, tuple[Child, CycleFigures | None]]:
        """Every command once against the simulator's account, in `COMMANDS` order."""
        results: dict[str, tuple[Child, CycleFigures | None]] = {
            SEQUENTIAL: (self.bare(simulator, requests, 1), None),
            CONCURRENT: (self.bare(simulator, requests, CONCURRENCY), None),
        }
        if requests:  # the same empty server before every baseline on the account
            self.client.flushall()
        env = self.notifier_env(simulator.url)
        results[BASELINE] = self.once(simulator, env, requests, baseline=True)
        results[STEADY] = self.once(simulator, env, requests, baseline=False)
        return results

    def _used_memory(self) -> int:
        """used_memory less the connected clients' buffers (this connection's, at rest)."""
        info = self.client.info("memory")
        return int(info["used_memory"]) - int(info["mem_clients_normal"])

    def _command_seconds(self) -> float:
        stats = self.client.info("commandstats")
        return sum(int(stat["usec"]) for stat in stats.values()) / 1e6

    def _wait_for_clients_to_leave(self) -> None:
        """Until Redis has closed the exited notifier's connections (this one stays)."""
        deadline = time.monotonic() + 5
        while self.client.info("clients")["connected_clients"] > 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the notifier's Redis connections did not close within 5 s")
            time.sleep(0.01)


Results = dict[str, list[tuple[Child, CycleFigures | None]]]


def measure(args: argparse.Namespace) -> tuple[dict[int, tuple[Results, Results]], str]:
    """For each size: every round's results against its account and the empty account."""
    measured: dict[int, tuple[Results, Results]] = {}
    with ExitStack() as stack:
        rig = Rig(stack.enter_context(redis_server()), args.page_size, args.api_rate_limit)
        empty_account = stack.enter_context(simulator_process(0, KEY, seed=args.seed))
        rig.round(empty_account, 0)  # warm-up: byte code, the Redis script cache
        for requests in args.requests:
            print(f"measuring {requests:,} requests …", file=sys.stderr, flush=True)
            with simulator_process(requests, KEY, seed=args.seed) as account:
                rig.bare(account, requests, CONCURRENCY)  # warm-up: the simulator sorts once
                full: Results = defaultdict(list)
                empty: Results = defaultdict(list)
                for _ in range(args.runs):
                    for name, result in rig.round(account, requests).items():
                        full[name].append(result)
                    for name, result in rig.round(empty_account, 0).items():
                        empty[name].append(result)
            measured[requests] = (full, empty)
        version = rig.client.info("server")["redis_version"]
        rig.client.close()
    return measured, version


def best_wall(results: Results, name: str) -> float:
    return min(child.wall_s for child, _ in results[name])


def best_cpu(results: Results, name: str, process: str = "cpu_s") -> float:
    """The least CPU `process` (a `Child` field) used over the rounds of a command."""
    return min(getattr(child, process) for child, _ in results[name])


def cpu_floor(results: Results, name: str) -> float:
    """The least wall time the CPU of the command, the simulator and redis-server allows on
    this machine's cores (best round)."""
    return min(
        (child.cpu_s + child.simulator_cpu_s + child.redis_cpu_s) / (os.cpu_count() or 1)
        for child, _ in results[name]
    )


def peak_rss(results: Results, name: str) -> float:
    return max(child.peak_rss_mb for child, _ in results[name])


def cycle_worst(results: Results, name: str, figure: str) -> float:
    """The largest of one `CycleFigures` figure over the rounds of a notifier command."""
    return max(getattr(cycle_figures, figure) for _, cycle_figures in results[name])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def background(measured: dict[int, tuple[Results, Results]]) -> str:
    """How much CPU other processes of the machine took during the fastest rounds."""
    worst, where = 0.0, ""
    for requests, results in measured.items():
        for account in results:
            for name in COMMANDS:
                child, _ = min(account[name], key=lambda result: result[0].wall_s)
                share = child.other_cpu_s / child.wall_s
                if share > worst:
                    worst, where = share, f"{requests:,} requests, {name}"
    if worst < BACKGROUND_WARNING:
        return f"background: other processes took at most {worst:.0%} of a core"
    return (
        f"WARNING: other processes took {worst:.0%} of a core during the fastest round of "
        f"{where}: run again on a quiet machine"
    )


def report(measured: dict[int, tuple[Results, Results]]) -> None:
    times, ratios, footprint, verdicts = [], [], [], []
    for requests, (full, empty) in measured.items():
        n = f"{requests:,}"
        net = {name: best_wall(full, name) - best_wall(empty, name) for name in COMMANDS}
        for name in COMMANDS:
            times.append(
                [
                    n,
                    name,
                    ms(best_wall(full, name)),
                    ms(best_wall(empty, name)),
                    ms(net[name]),
                    f"{best_cpu(full, name):.2f} s",
                    f"{best_cpu(full, name, 'simulator_cpu_s'):.2f} s",
                    f"{best_cpu(full, name, 'redis_cpu_s'):.2f} s",
                    ms(cpu_floor(full, name)),
                    f"{peak_rss(full, name):.0f} MB",
                ]
            )
        for cycle in (BASELINE, STEADY):
            for bare, target in (
                (SEQUENTIAL, TARGET_VS_SEQUENTIAL),
                (CONCURRENT, TARGET_VS_CONCURRENT),
            ):
                whole = best_wall(full, cycle) / best_wall(full, bare)
                ratio = net[cycle] / net[bare]
                row = [n, f"{cycle} / {bare}", f"{whole:.2f}x", f"{ratio:.2f}x"]
                if cycle == BASELINE:
                    row.append(f"≤ {target}x")
                    verdict = "PASS" if ratio <= target else "FAIL"
                    verdicts.append(
                        f"{verdict}: {n} requests, net {cycle} / net {bare} = {ratio:.2f}x "
                        f"(target ≤ {target}x)"
                    )
                else:
                    row.append("")
                ratios.append(row)
        for cycle in (BASELINE, STEADY):
            cpu, cpu_empty = best_cpu(full, cycle), best_cpu(empty, cycle)
            footprint.append(
                [
                    n,
                    cycle,
                    f"{cycle_worst(full, cycle, 'listed'):,.0f}",
                    f"{cpu / requests * 1e6:.1f} ms",
                    f"{(cpu - cpu_empty) / requests * 1e6:.1f} ms",
                    f"{cycle_worst(full, cycle, 'command_s') / requests * 1e6:.1f} ms",
                    f"{peak_rss(full, cycle):.0f} MB",
                    f"{cycle_worst(full, cycle, 'bytes_added') / requests:.1f} B"
                    if cycle == BASELINE
                    else "",
                ]
            )
        if requests == TARGET_AT:
            rss = max(peak_rss(full, cycle) for cycle in (BASELINE, STEADY))
            per_request = cycle_worst(full, BASELINE, "bytes_added") / requests
            verdicts.append(
                f"{'PASS' if rss <= TARGET_RSS_MB else 'FAIL'}: {n} requests, peak RSS of "
                f"notifier once {rss:.0f} MB (target ≤ {TARGET_RSS_MB:.0f} MB)"
            )
            verdicts.append(
                f"{'PASS' if per_request <= TARGET_BYTES else 'FAIL'}: {n} requests, Redis "
                f"{per_request:.1f} B per tracked request (target ≤ {TARGET_BYTES:.0f} B)"
            )
    print()
    print(
        markdown_table(
            [
                "requests",
                "command",
                "whole process",
                "empty account",
                "net",
                "CPU",
                "simulator CPU",
                "redis-server CPU",
                "CPU floor",
                "peak RSS",
            ],
            times,
            left=2,
        )
    )
    print()
    print(markdown_table(["requests", "ratio", "whole process", "net", "target"], ratios, left=2))
    print()
    print(
        markdown_table(
            [
                "requests",
                "cycle",
                "listed",
                "CPU per 1,000 requests",
                "CPU per 1,000, net",
                "Redis time per 1,000",
                "peak RSS",
                "Redis per tracked request",
            ],
            footprint,
            left=2,
        )
    )
    print()
    print("\n".join(verdicts))
    print(background(measured))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[50_000, 100_000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--api-rate-limit",
        type=float,
        default=UNTHROTTLED,
        help="NOTIFIER_API_RATE_LIMIT of the notifier (calls a second)",
    )
    args = parser.parse_args()
    if min(args.requests) < 1 or args.runs < 1 or args.page_size < 1:
        parser.error("--requests, --runs and --page-size must be at least 1")
    if args.api_rate_limit <= 0:
        parser.error("--api-rate-limit must be positive")
    try:
        measured, version = measure(args)
    except KeyboardInterrupt:
        raise SystemExit("interrupted; redis-server and the simulators are stopped") from None
    python = os.path.relpath(sys.executable)
    command = " ".join([sys.executable if python.startswith("..") else python, *sys.argv])
    print(f"command: {command}")
    print(f"notifier: {notifier_source()}")
    print(
        f"best of {args.runs} rounds, pages of {args.page_size}, NOTIFIER_API_RATE_LIMIT "
        f"{args.api_rate_limit:,.10g}/s, {os.cpu_count()} CPUs, "
        f"redis-server {version}, simulator in its own process (seed {args.seed}), every "
        f"command a process of its own; net = against the account less against an empty one"
    )
    report(measured)


if __name__ == "__main__":
    main()
