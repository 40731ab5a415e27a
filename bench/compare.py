"""Before and after: `notifier once` of two notifier sources, interleaved on one account.

    python bench/compare.py BEFORE_DIR [--after AFTER_DIR] [--requests 100000] [--rounds 7]

BEFORE_DIR (and AFTER_DIR; by default the notifier `import notifier` finds) is a directory
holding a `notifier` package and its templates, e.g. an export of an earlier commit:
`git archive COMMIT notifier templates | tar -x -C BEFORE_DIR`.

A change's effect cannot be read from two runs of bench/cycle.py: a shared machine's speed
drifts by more than most changes are worth. Here every round runs a baseline `notifier
once` of each source on a fresh namespace (the server flushed before each), in alternating
order, against the same simulator process and redis-server, so both meet the same
drift. It prints the best and median wall time and CPU of each, and after / before of
each figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
from contextlib import ExitStack
from pathlib import Path

from cycle import KEY, Child, Rig

from common import (
    SimulatorProcess,
    markdown_table,
    notifier_source,
    redis_server,
    simulator_process,
)


def run_once(rig: Rig, source: Path, simulator: SimulatorProcess, requests: int) -> Child:
    """One baseline `notifier once` of the notifier in `source`, on an emptied server."""
    rig.client.flushall()
    env = rig.notifier_env(simulator.url)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    child, _ = rig.once(simulator, env, requests, baseline=True)
    return child


def _ratio(figures: dict[str, float]) -> str:
    # CPU is counted in clock ticks, so a short run's Redis CPU may read 0.
    return f"{figures['after'] / figures['before']:.2f}x" if figures["before"] else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="directory holding the earlier notifier")
    parser.add_argument("--after", type=Path, default=Path(notifier_source()).parent)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--page-size", type=int, default=100)
    args = parser.parse_args()
    sources = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, source in sources.items():
        if not (source / "notifier" / "__init__.py").is_file():
            parser.error(f"{name}: {source} holds no notifier package")
    runs: dict[str, list[Child]] = {name: [] for name in sources}
    with ExitStack() as stack:
        rig = Rig(stack.enter_context(redis_server()), args.page_size, 1_000_000)
        simulator = stack.enter_context(simulator_process(args.requests, KEY))
        for source in sources.values():  # untimed warm-up: byte code, script cache
            run_once(rig, source, simulator, args.requests)
        for round_ in range(args.rounds):
            order = list(sources.items())
            for name, source in order if round_ % 2 == 0 else reversed(order):
                runs[name].append(run_once(rig, source, simulator, args.requests))
    print(f"{args.requests:,} requests, pages of {args.page_size}, {args.rounds} rounds")
    for name, source in sources.items():
        print(f"{name}: {source}")
    rows = []
    for figure in ("wall_s", "cpu_s", "redis_cpu_s"):
        best, median = {}, {}
        for name, children in runs.items():
            best[name] = min(getattr(child, figure) for child in children)
            median[name] = statistics.median(getattr(child, figure) for child in children)
        rows.append(
            [
                figure.removesuffix("_s").replace("_", " "),
                *(f"{best[name]:.2f} s / {median[name]:.2f} s" for name in runs),
                f"{_ratio(best)} / {_ratio(median)}",
            ]
        )
    print(
        markdown_table(
            ["figure", "before (best / median)", "after (best / median)", "after / before"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
