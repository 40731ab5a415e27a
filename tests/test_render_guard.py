"""Hostile templates: a render has a deadline and cannot make anything large.

The design ("Hostile input never stops the notifier"): a render longer than 2 s is a
failure of that event on that route; it never blocks other routes, the event loop or
SIGTERM, and no template grows the process's memory without bound. These tests render
templates written to break that, with a short deadline to stay fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from notifier.config import Route, Settings, load_settings
from notifier.render import Renderer, RenderError, sample_digest, sample_event, sections
from notifier.render_guard import MAX_RENDER_CHARS
from notifier.render_pool import DeadlineExceeded, RenderPool

TIMEOUT_S = 0.3
RUNAWAY = '{"a": 1{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}}'
QUICK = '{"a": 1}'


def configure(tmp_path: Path, templates: dict[str, str]) -> Settings:
    """Settings with a webhook route per template, named like the template, in tmp_path."""
    routes = []
    for index, (name, text) in enumerate(templates.items()):
        (tmp_path / f"{name}.json.j2").write_text(text, encoding="utf-8")
        routes.append(
            f'[[routes]]\nname = "{name}"\ntype = "webhook"\n'
            f'url = "http://127.0.0.1:9/{index}"\ntemplate = "{name}.json.j2"\n'
        )
    (tmp_path / "n.toml").write_text("".join(routes))
    return load_settings({"config": str(tmp_path / "n.toml"), "templates_dir": str(tmp_path)})


def renderer_for(
    tmp_path: Path, templates: dict[str, str], timeout_s: float
) -> tuple[Renderer, dict[str, Route]]:
    """A renderer with `timeout_s` for `templates`, and its routes by name."""
    settings = configure(tmp_path, templates)
    return Renderer(settings, timeout_s=timeout_s), {r.name: r for r in settings.routes}


def failure(renderer: Renderer, route: Route) -> tuple[str, float]:
    """The RenderError message of rendering an event for `route`, and how long it took."""
    start = time.monotonic()
    with pytest.raises(RenderError) as caught:
        renderer.render(route, sample_event("completed"))
    return str(caught.value), time.monotonic() - start


def cpu_used_while_sleeping(seconds: float = 0.3) -> float:
    """The CPU time this process uses while the test sleeps: about 0 when nothing runs."""
    cpu = time.process_time()
    time.sleep(seconds)
    return time.process_time() - cpu


def eventually(condition: Callable[[], bool], within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# 1. The deadline.


def test_a_render_longer_than_the_deadline_fails_naming_the_route_and_template(
    tmp_path: Path,
) -> None:
    renderer, routes = renderer_for(tmp_path, {"runaway": RUNAWAY}, TIMEOUT_S)
    message, took = failure(renderer, routes["runaway"])
    assert message == (
        "route 'runaway', template runaway.json.j2: "
        "the render took longer than 0.3 s and was stopped"
    )
    assert TIMEOUT_S <= took < TIMEOUT_S + 0.5


def test_a_render_past_its_deadline_is_stopped_and_its_thread_ends(tmp_path: Path) -> None:
    renderer, routes = renderer_for(tmp_path, {"runaway": RUNAWAY, "quick": QUICK}, TIMEOUT_S)
    threads = threading.active_count()
    failure(renderer, routes["runaway"])
    assert eventually(lambda: threading.active_count() <= threads), "the render thread lives on"
    assert cpu_used_while_sleeping() < 0.1, "the render still burns the CPU"
    start = time.monotonic()
    assert renderer.render(routes["quick"], sample_event("completed")).body == b'{"a":1}'
    assert time.monotonic() - start < 0.5


async def test_render_async_keeps_the_event_loop_running(tmp_path: Path) -> None:
    renderer, routes = renderer_for(tmp_path, {"runaway": RUNAWAY}, TIMEOUT_S)
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    with pytest.raises(RenderError, match=r"took longer than 0\.3 s"):
        await renderer.render_async(routes["runaway"], sample_event("completed"))
    ticking.cancel()
    gaps = [later - earlier for earlier, later in itertools.pairwise(ticks)]
    assert len(ticks) >= 15
    assert max(gaps) < 0.2, f"the loop stalled for {max(gaps):.3f} s"


async def test_another_route_renders_while_a_runaway_render_runs(tmp_path: Path) -> None:
    renderer, routes = renderer_for(tmp_path, {"runaway": RUNAWAY, "quick": QUICK}, 5.0)
    event = sample_event("completed")
    runaway = asyncio.create_task(renderer.render_async(routes["runaway"], event))
    await asyncio.sleep(0.05)
    start = time.monotonic()
    message = await renderer.render_async(routes["quick"], event)
    assert message.body == b'{"a":1}'
    assert time.monotonic() - start < 1.0  # not the runaway's 5 s
    assert not runaway.done()
    runaway.cancel()  # as at SIGTERM: the render stops with its caller
    with pytest.raises(asyncio.CancelledError):
        await runaway
    assert cpu_used_while_sleeping() < 0.1, "the cancelled render still burns the CPU"


def test_a_thread_stuck_in_c_code_is_replaced_and_ends_on_its_own() -> None:
    pool = RenderPool()
    threads = threading.active_count()
    with pytest.raises(DeadlineExceeded):
        pool.run(lambda: time.sleep(0.5), 0.05)  # an interruption waits for sleep to return
    start = time.monotonic()
    assert pool.run(lambda: 42, 1.0) == 42
    assert time.monotonic() - start < 0.3, "the next job waited for the stuck one"
    assert eventually(lambda: threading.active_count() <= threads + 1)


def test_interruptions_racing_the_end_of_their_jobs_never_kill_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Jobs that end around their deadline, some just after it: the interruption then
    # arrives inside the job, just after it, or not at all. No thread may die of it, and
    # the pool keeps working. Switching threads often makes the late arrivals frequent.
    died: list[type[BaseException]] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_type))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    pool = RenderPool()
    try:
        for attempt in range(2000):
            end = time.monotonic() + 0.0005 + (attempt % 40) * 10e-6

            def spin(end: float = end) -> int:
                while time.monotonic() < end:
                    pass
                return 1

            with contextlib.suppress(DeadlineExceeded):
                pool.run(spin, 0.0005)
    finally:
        sys.setswitchinterval(interval)
    assert died == []
    assert pool.run(lambda: 7, 1.0) == 7


def test_a_template_nested_too_deep_to_compile_is_a_render_error(tmp_path: Path) -> None:
    renderer, routes = renderer_for(
        tmp_path, {"deep": '{"a": {{ ' + "(" * 5000 + "1" + ")" * 5000 + " }}}"}, TIMEOUT_S
    )
    message, _ = failure(renderer, routes["deep"])
    assert (
        message
        == "route 'deep', template deep.json.j2: RecursionError: maximum recursion depth exceeded"
    )


def test_a_job_that_raises_timeout_error_is_not_a_deadline() -> None:
    def late() -> None:
        raise TimeoutError("the job's own")

    with pytest.raises(TimeoutError, match="the job's own"):
        RenderPool().run(late, 1.0)


# 2. Bounds on what a template can make.

NAMESPACE_DOUBLING = (
    '{% set ns = namespace(s="x") %}{% for _ in range(64) %}{% set ns.s = ns.s ~ ns.s %}'
    '{% endfor %}{"a": {{ ns.s | length }}}'
)
MACRO_DOUBLING = '{% macro d(s) %}{{ d(s ~ s) }}{% endmacro %}{"a": {{ d("x") | length }}}'
JOIN_REPEATED = '{"a": "{% for _ in range(100000) %}{{ range(100000) | join }}{% endfor %}"}'
TOO_LARGE = "characters or more; the limit is 4,194,304"
HOSTILE = {
    "repeat": ('{"a": {{ ("a" * 10**9) | length }}}', TOO_LARGE),
    "center": ('{"a": {{ "x" | center(10**9) | length }}}', TOO_LARGE),
    "center-literal": ('{"a": {{ "x" | center(1000000000) | length }}}', TOO_LARGE),
    "percent": ('{"a": {{ ("%0999999999d" % 1) | length }}}', TOO_LARGE),
    "percent-star": ('{"a": {{ ("%*d" % (10**9, 1)) | length }}}', TOO_LARGE),
    "format-filter": ('{"a": {{ "%999999999s" | format(1) | length }}}', TOO_LARGE),
    "str-format": ('{"a": {{ "{:>999999999}".format(1) | length }}}', TOO_LARGE),
    "str-format-nested": ('{"a": {{ "{:{}}".format(1, 10**9) | length }}}', TOO_LARGE),
    "str-format-map": ('{"a": {{ "{x:>999999999}".format_map({"x": 1}) | length }}}', TOO_LARGE),
    "str-center": ('{"a": {{ "x".center(10**9) | length }}}', TOO_LARGE),
    "str-join": ('{"a": {{ ("x" * 1000).join(["y" * 1000000] * 100) | length }}}', TOO_LARGE),
    "str-replace": ('{"a": {{ ("x" * 100000).replace("", "y" * 1000) | length }}}', TOO_LARGE),
    "expandtabs": ('{"a": {{ ("\\t" * 100000).expandtabs(100000) | length }}}', TOO_LARGE),
    "to-bytes": ('{"a": {{ (1).to_bytes(10**9, "big") | length }}}', TOO_LARGE),
    "replace": ('{"a": {{ ("x" * 100000) | replace("x", "y" * 1000) | length }}}', TOO_LARGE),
    "indent": ('{"a": {{ ("\\n" * 100000) | indent(1000) | length }}}', TOO_LARGE),
    "wordwrap": ('{"a": {{ ("x" * 1000000) | wordwrap(1) | length }}}', TOO_LARGE),
    "batch": ('{"a": {{ [1] | batch(10**9, 0) | list | length }}}', TOO_LARGE),
    "slice": ('{"a": {{ [1] | slice(10**9) | list | length }}}', TOO_LARGE),
    "join": ('{"a": {{ (["x" * 1000000] * 100) | join | length }}}', TOO_LARGE),
    "namespace-doubling": (NAMESPACE_DOUBLING, TOO_LARGE),
    "macro-doubling": (MACRO_DOUBLING, TOO_LARGE),
    "list-printed": ('{% set l = ["x" * 1000000] * 1000 %}{"a": "{{ l }}"}', TOO_LARGE),
    "list-as-json": ('{% set l = ["x" * 1000000] * 1000 %}{"a": {{ l | tojson }}}', TOO_LARGE),
    "list-as-text": (
        '{% set l = ["x" * 1000000] * 1000 %}{"a": {{ l | string | length }}}',
        TOO_LARGE,
    ),
    "captured-block": (
        "{% set s %}{% for _ in range(100000) %}{{ range(100000) | join }}{% endfor %}"
        '{% endset %}{"a": {{ s | length }}}',
        TOO_LARGE,
    ),
    "join-repeated": (JOIN_REPEATED, "the output is longer than 4,194,304 characters"),
    "kept-in-a-list": (
        '{% set l = [] %}{% for _ in range(100000) %}{% set _ = l.append("a" * 4000000) %}'
        '{% endfor %}{"a": {{ l | length }}}',
        "makes more than 67,108,864 characters in all",
    ),
    "power": ('{"a": {{ (10 ** (10 ** 8)) % 7 }}}', "a number of more than 16,384 bits"),
    "squaring": (
        "{% set ns = namespace(n=3) %}{% for _ in range(64) %}{% set ns.n = ns.n * ns.n %}"
        '{% endfor %}{"a": {{ ns.n % 7 }}}',
        "a number of more than 16,384 bits",
    ),
    "round": ('{"a": {{ 5 | round(-1000000000) }}}', "a number of more than 16,384 bits"),
    "recursion": (
        '{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{"a": {{ r(0) | length }}}',
        "RecursionError: maximum recursion depth exceeded",
    ),
    "lipsum": ('{"a": {{ lipsum(1000000) | length }}}', "'lipsum' is undefined"),
}


STILL_FINE = {
    "repeat": ('{"a": {{ ("ab" * 1000) | length }}}', 2000),
    "range-list": ('{"a": {{ range(100000) | list | length }}}', 100000),
    "percent": ('{"a": {{ ("%5d|%-3s|%.2f" % (3, "x", 1.5)) | length }}}', 14),
    "format": ('{"a": {{ "{:>10}{}".format(1, event.detected_at) | length }}}', 30),
    "format-ms": ('{"a": {{ "{}".format(1774868470000) | length }}}', 13),
    "center": ('{"a": {{ "ab" | center(100) | length }}}', 100),
    "power": ('{"a": {{ (10 ** 100) % 7 }}}', 10**100 % 7),
    "append": (
        '{% set l = [] %}{% for i in range(1000) %}{% set _ = l.append(i ~ "") %}'
        '{% endfor %}{"a": {{ l | join(",") | length }}}',
        3889,
    ),
    "namespace": (
        '{% set ns = namespace(s="") %}{% for i in range(1000) %}{% set ns.s = ns.s ~ "ab" %}'
        '{% endfor %}{"a": {{ ns.s | length }}}',
        2000,
    ),
    "macro": ('{% macro m(x) %}<{{ x }}>{% endmacro %}{"a": {{ m("y" * 100) | length }}}', 102),
}


@pytest.mark.parametrize(("template", "length"), STILL_FINE.values(), ids=STILL_FINE.keys())
def test_templates_within_the_bounds_render_as_before(
    tmp_path: Path, template: str, length: int
) -> None:
    renderer, routes = renderer_for(tmp_path, {"fine": template}, 5.0)
    body = renderer.render(routes["fine"], sample_event("completed")).body
    assert json.loads(body) == {"a": length}


@pytest.mark.parametrize("kind", ["slack", "webhook"])
def test_a_bundled_digest_of_1000_requests_renders_within_the_bounds(kind: str) -> None:
    settings = load_settings(
        {"slack_webhook_url": "https://hooks.slack.com/services/T/B/X", "webhook_url": "http://x/"}
    )
    digest_route = next(route for route in settings.routes if route.name == kind)
    body = Renderer(settings).render(digest_route, sample_digest(digest_route, 1000)).body
    assert len(body) < MAX_RENDER_CHARS / 4


def test_the_sections_filter_does_not_format_its_more_text() -> None:
    # `more` comes from a template: as a format string it would read attributes outside
    # the sandbox and pad to any width.
    more = "{n} {n.__class__} {n:>999999999}"
    assert sections(["a", "b", "c"], limit=3, most=1, more=more) == [
        "3 {n.__class__} {n:>999999999}"
    ]


# 3. The hostile templates above, rendered in a process whose memory is limited to a
# gigabyte more than it starts with: a regression fails there instead of taking the
# machine's memory.

UNDER_A_LIMIT = """
import json, resource, sys, time
from notifier.config import load_settings
from notifier.render import Renderer, RenderError, sample_event

def address_space():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

settings = load_settings({"config": sys.argv[1], "templates_dir": sys.argv[2]})
renderer = Renderer(settings, timeout_s=5)
_, hard = resource.getrlimit(resource.RLIMIT_AS)
soft = address_space() + 2**30
if hard != resource.RLIM_INFINITY:
    soft = min(soft, hard)
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
for route in settings.routes:
    start = time.monotonic()
    try:
        renderer.render(route, sample_event("completed"))
        error = None
    except RenderError as exc:
        error = str(exc)
    print(json.dumps({"route": route.name, "error": error, "took": time.monotonic() - start}))
"""


@pytest.fixture(scope="module")
def hostile_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """What rendering each HOSTILE template (after one line of comment) did, by name."""
    if sys.platform != "linux":
        pytest.skip("reads /proc/self/status")
    directory = tmp_path_factory.mktemp("hostile")
    configure(directory, {name: "{#- comment -#}\n" + text for name, (text, _) in HOSTILE.items()})
    result = subprocess.run(
        [sys.executable, "-c", UNDER_A_LIMIT, str(directory / "n.toml"), str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return {line["route"]: line for line in map(json.loads, result.stdout.splitlines())}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_template_that_makes_too_much_fails_at_once_naming_the_line(
    hostile_outcomes: dict[str, dict[str, Any]], name: str
) -> None:
    reason = HOSTILE[name][1]
    error, took = hostile_outcomes[name]["error"], hostile_outcomes[name]["took"]
    assert error is not None, "it rendered"
    assert reason in error
    assert error.startswith(f"route {name!r}, template {name}.json.j2")
    if "output" not in reason:
        assert ", line 2: " in error
    assert took < 1.5, "stopped by the deadline, not by a bound"
