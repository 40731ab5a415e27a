"""`notifier check` and `notifier send-test`, run as a user runs them, against local services.

The simulator and the receivers are served by the test's own event loop, so the command
runs as an asyncio subprocess. Every run is checked for leaked secrets.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from notifier.check import CHECK_MISCONFIGURED, CHECK_PASSED, CHECK_UNREACHABLE, check_api
from notifier.config import load_settings
from notifier.simulator import Fault, FaultKind, Simulator

from conftest import RedisServer, free_port
from samples import SIMULATOR_KEY

WRONG_KEY = "sk-live-ZZLEAK-wrong-key-9d2e"
SLACK_PATH = "/services/T0/B0/ZZLEAK-slack-token"
WEBHOOK_PATH = "/hook"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"ZZLEAK-signing-key-bytes").decode()
REDIS_PASSWORD = "ZZLEAK-redis-pass"  # noqa: S105 - a fake, asserted never to be printed
SECRETS = (
    SIMULATOR_KEY,
    WRONG_KEY,
    SLACK_PATH,
    "ZZLEAK-slack-token",
    WEBHOOK_SECRET,
    WEBHOOK_SECRET.removeprefix("whsec_"),
    REDIS_PASSWORD,
    "ZZLEAK",
)
TIMEOUT = 60


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def assert_no_secret(result: Result) -> None:
    """No secret value, whole or in part, in anything the command printed."""
    printed = result.stdout + result.stderr
    for secret in SECRETS:
        assert secret not in printed, f"{secret!r} leaked:\n{printed}"


async def notifier(*args: str, env: Mapping[str, str], cwd: Path | None = None) -> Result:
    """Run `python -m notifier` with these NOTIFIER_* variables; never leaks, never crashes."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "notifier",
        *args,
        env={**os.environ, **env},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    result = Result(process.returncode, out.decode(), err.decode())
    assert "Traceback" not in result.stderr, result.stderr
    assert_no_secret(result)
    return result


@dataclass
class Received:
    path: str
    method: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A local HTTP server that records every request and answers per path."""

    base: str = ""
    requests: list[Received] = field(default_factory=list)
    answers: dict[str, int] = field(default_factory=dict)  # path -> status (default 200)

    @property
    def slack_url(self) -> str:
        return self.base + SLACK_PATH

    @property
    def webhook_url(self) -> str:
        return self.base + WEBHOOK_PATH

    def to(self, path: str) -> list[Received]:
        return [request for request in self.requests if request.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(Received(request.path, request.method, dict(request.headers), body))
        status = self.answers.get(request.path, 200)
        if status == 200:
            return web.Response(text="ok")
        # A careless receiver echoes the URL it was called on: a Slack URL is a secret.
        return web.Response(status=status, text=f"rejected a POST to {request.url}")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    received = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", received.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    received.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield received
    await runner.cleanup()
    sock.close()


@pytest.fixture
def good_env(api_url: str, receiver: Receiver, redis_server: RedisServer) -> dict[str, str]:
    """A configuration where everything works: two routes, Redis and the simulator."""
    return {
        "NOTIFIER_API_URL": api_url,
        "NOTIFIER_API_KEY": SIMULATOR_KEY,
        "NOTIFIER_SLACK_WEBHOOK_URL": receiver.slack_url,
        "NOTIFIER_WEBHOOK_URL": receiver.webhook_url,
        "NOTIFIER_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "NOTIFIER_REDIS_URL": redis_server.url,
    }


def table_rows(stdout: str) -> list[list[str]]:
    """The rows of the `check` table, header first, split on the two-space column gaps."""
    return [re.split(r"\s{2,}", line, maxsplit=2) for line in stdout.splitlines()]


def row(stdout: str, subject: str, part: str = "") -> str:
    """The one line of the table for `subject` whose PART column starts with `part`."""
    lines = [
        line
        for line in stdout.splitlines()
        if line.startswith(subject + " ") and line[len(subject) :].strip().startswith(part)
    ]
    assert len(lines) == 1, f"expected one row for {subject} {part}:\n{stdout}"
    return lines[0]


# --- check: a good configuration ---------------------------------------------------------


async def test_check_passes_on_a_good_configuration_and_sends_nothing(
    good_env: dict[str, str], receiver: Receiver, simulator: Simulator, api_url: str
) -> None:
    result = await notifier("check", env=good_env)

    assert result.returncode == CHECK_PASSED, result.stdout + result.stderr
    header, *rows = table_rows(result.stdout)
    assert header == ["CHECK", "PART", "RESULT"]
    assert all(cells[2].startswith("ok: ") for cells in rows), result.stdout
    for route, template in [
        ("slack", "slack/completed.json.j2 (completed)"),
        ("slack", "slack/failed.json.j2 (failed)"),
        ("webhook", "webhook/default.json.j2 (completed)"),
        ("webhook", "webhook/default.json.j2 (failed)"),
    ]:
        assert "ok: renders" in row(result.stdout, f"route {route}", template)
    assert "ok: reachable (Redis " in row(result.stdout, "redis", "NOTIFIER_REDIS_URL")
    assert "ok: key accepted" in row(result.stdout, "api", api_url)
    assert len(rows) == 6
    assert receiver.requests == []  # check never sends
    assert simulator.calls == 1  # the API is called once


# --- check: broken configurations --------------------------------------------------------

HEADER_TOO_LONG = json.dumps(
    {
        "text": "fallback",
        "blocks": [{"type": "header", "text": {"type": "plain_text", "text": "H" * 151}}],
    }
)
# Templates broken on a known line (line 1 is "{"), and one that renders.
NOT_JSON = '{\n  "type": {{ event.type | tojson }},\n}\n'
UNDEFINED_ON_LINE_3 = (
    '{\n  "id": {{ request.id | tojson }},\n  "x": {{ no_such_var | tojson }}\n}\n'
)
TYPO_ON_LINE_3 = (
    '{\n  "id": {{ request.id | tojson }},\n  "url": {{ request.outptu_url | tojson }}\n}\n'
)
SYNTAX_ERROR_ON_LINE_2 = '{\n  "id": {{ request.id | tojson ) }}\n}\n'
VALID_CUSTOM = '{"type": {{ event.type | tojson }}}\n'
TOML_ROUTE = (
    'templates_dir = "tpl"\n'
    "[[routes]]\n"
    'name = "ops"\n'
    'type = "webhook"\n'
    'url = "http://127.0.0.1:9/ops"\n'
    'template = "custom/{status}.json.j2"\n'
)
DEAD_REDIS = "redis://:" + REDIS_PASSWORD + "@127.0.0.1:{dead}/0"
DEAD_API = "http://127.0.0.1:{dead}/api"


@dataclass(frozen=True)
class Broken:
    """One broken configuration of `check` and what the table must say about it."""

    exit_code: int
    failing: tuple[tuple[str, str], ...]  # (subject, part prefix) of every failing row
    fragments: tuple[str, ...]  # text of the failing rows, all of it
    env: dict[str, str] = field(default_factory=dict)  # "{dead}" becomes a free port
    templates: dict[str, str] = field(default_factory=dict)
    toml: str | None = None


BROKEN = {
    "webhook-template-not-json": Broken(
        CHECK_MISCONFIGURED,
        (
            ("route webhook", "webhook/default.json.j2 (completed)"),
            ("route webhook", "webhook/default.json.j2 (failed)"),
        ),
        ("route 'webhook'", "template webhook/default.json.j2", "not valid JSON"),
        templates={"webhook/default.json.j2": NOT_JSON},
    ),
    "undefined-variable-line-3": Broken(
        CHECK_MISCONFIGURED,
        (
            ("route webhook", "webhook/default.json.j2 (completed)"),
            ("route webhook", "webhook/default.json.j2 (failed)"),
        ),
        ("route 'webhook'", "webhook/default.json.j2", "line 3"),
        templates={"webhook/default.json.j2": UNDEFINED_ON_LINE_3},
    ),
    "syntax-error-line-2": Broken(
        CHECK_MISCONFIGURED,
        (("route slack", "slack/completed.json.j2 (completed)"),),
        ("route 'slack'", "slack/completed.json.j2", "line 2"),
        templates={"slack/completed.json.j2": SYNTAX_ERROR_ON_LINE_2},
    ),
    "slack-header-over-150": Broken(
        CHECK_MISCONFIGURED,
        (("route slack", "slack/completed.json.j2 (completed)"),),
        ("route 'slack'", "slack/completed.json.j2", "header text is 151 characters", "150"),
        templates={"slack/completed.json.j2": HEADER_TOO_LONG},
    ),
    "toml-route-template-line-3": Broken(
        CHECK_MISCONFIGURED,
        (("route ops", "custom/failed.json.j2 (failed)"),),
        ("route 'ops'", "custom/failed.json.j2", "line 3"),
        templates={
            "custom/completed.json.j2": VALID_CUSTOM,
            "custom/failed.json.j2": UNDEFINED_ON_LINE_3,
        },
        toml=TOML_ROUTE,
    ),
    "toml-route-template-missing": Broken(
        CHECK_MISCONFIGURED,
        (("route ops", "custom/completed.json.j2"), ("route ops", "custom/failed.json.j2")),
        ("route 'ops'", "custom/", "not found"),
        toml=TOML_ROUTE,
    ),
    "gigabyte-string-line-2": Broken(
        CHECK_MISCONFIGURED,
        (("route slack", "slack/completed.json.j2 (completed)"),),
        ("route 'slack'", "slack/completed.json.j2", "line 2", "the limit is 4,194,304"),
        templates={"slack/completed.json.j2": '{"text": "x",\n"n": {{ ("a" * 10**9) | length }}}'},
    ),
    "runaway-loop": Broken(
        CHECK_MISCONFIGURED,
        (("route slack", "slack/completed.json.j2 (completed)"),),
        ("route 'slack'", "slack/completed.json.j2", "took longer than 2 s and was stopped"),
        templates={
            "slack/completed.json.j2": '{"text": "x"'
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}}"
        },
    ),
    "redis-unreachable": Broken(
        CHECK_UNREACHABLE,
        (("redis", "NOTIFIER_REDIS_URL"),),
        ("unreachable",),
        env={"NOTIFIER_REDIS_URL": DEAD_REDIS},
    ),
    "wrong-api-key": Broken(
        CHECK_MISCONFIGURED,
        (("api", "http://"),),
        ("rejected the API key", "invalid token"),
        env={"NOTIFIER_API_KEY": WRONG_KEY},
    ),
    "api-down": Broken(
        CHECK_UNREACHABLE,
        (("api", "http://"),),
        ("could not reach",),
        env={"NOTIFIER_API_URL": DEAD_API},
    ),
    "redis-and-api-down": Broken(
        CHECK_UNREACHABLE,
        (("redis", "NOTIFIER_REDIS_URL"), ("api", "http://")),
        ("unreachable", "could not reach"),
        env={"NOTIFIER_REDIS_URL": DEAD_REDIS, "NOTIFIER_API_URL": DEAD_API},
    ),
    "misconfigured-wins-over-unreachable": Broken(
        CHECK_MISCONFIGURED,
        (("route slack", "slack/completed.json.j2 (completed)"), ("redis", "NOTIFIER_REDIS_URL")),
        ("line 2", "unreachable"),
        env={"NOTIFIER_REDIS_URL": DEAD_REDIS},
        templates={"slack/completed.json.j2": SYNTAX_ERROR_ON_LINE_2},
    ),
    "wrong-key-wins-over-redis-down": Broken(
        CHECK_MISCONFIGURED,
        (("redis", "NOTIFIER_REDIS_URL"), ("api", "http://")),
        ("unreachable", "invalid token"),
        env={"NOTIFIER_REDIS_URL": DEAD_REDIS, "NOTIFIER_API_KEY": WRONG_KEY},
    ),
}


async def test_check_names_the_undefined_variable_of_a_typo(
    good_env: dict[str, str], tmp_path: Path
) -> None:
    # The bundled templates pass every value through tojson; a typo there is the common
    # mistake, and StrictUndefined exists so that the message says which name is wrong.
    (tmp_path / "webhook").mkdir()
    (tmp_path / "webhook" / "default.json.j2").write_text(TYPO_ON_LINE_3, encoding="utf-8")
    env = {**good_env, "NOTIFIER_TEMPLATES_DIR": str(tmp_path)}

    result = await notifier("check", env=env)

    assert result.returncode == CHECK_MISCONFIGURED
    line = row(result.stdout, "route webhook", "webhook/default.json.j2 (completed)")
    assert "line 3" in line
    assert "outptu_url" in line, line


async def test_check_says_a_wrong_redis_password_is_misconfigured(
    good_env: dict[str, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    # A Redis that answers but refuses the password will refuse it again later: a retry
    # cannot help, so this is a configuration error (exit 2), like a rejected API key.
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        redis_server.binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        *("--requirepass", "the-right-password", "--dir", str(tmp_path)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
            else:
                writer.close()
                await writer.wait_closed()
                break
        env = {**good_env, "NOTIFIER_REDIS_URL": DEAD_REDIS.replace("{dead}", str(port))}
        result = await notifier("check", env=env)
    finally:
        process.terminate()
        await process.wait()

    line = row(result.stdout, "redis", "NOTIFIER_REDIS_URL")
    assert "FAIL: " in line
    assert "refused the credentials" in line
    assert result.returncode == CHECK_MISCONFIGURED, result.stdout


@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN.keys())
async def test_check_reports_each_broken_part_and_exits_by_kind(
    case: Broken, good_env: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    dead = str(free_port())
    env = {**good_env, **{name: value.replace("{dead}", dead) for name, value in case.env.items()}}
    templates = tmp_path / "tpl"
    templates.mkdir()
    for name, text in case.templates.items():
        (templates / name).parent.mkdir(parents=True, exist_ok=True)
        (templates / name).write_text(text, encoding="utf-8")
    if case.toml is None:
        env["NOTIFIER_TEMPLATES_DIR"] = str(templates)
    else:
        (tmp_path / "notifier.toml").write_text(case.toml, encoding="utf-8")
        env["NOTIFIER_CONFIG"] = str(tmp_path / "notifier.toml")

    result = await notifier("check", env=env)

    assert result.returncode == case.exit_code, result.stdout + result.stderr
    failing = [row(result.stdout, subject, part) for subject, part in case.failing]
    assert all("FAIL: " in line for line in failing), result.stdout
    text = "\n".join(failing)
    for fragment in case.fragments:
        assert fragment in text, f"{fragment!r} not in:\n{result.stdout}"
    _header, *rows = table_rows(result.stdout)
    assert sum(cells[2].startswith("FAIL: ") for cells in rows) == len(case.failing)
    assert receiver.requests == []


# --- send-test -----------------------------------------------------------------------------


@pytest.fixture
def routes_env(receiver: Receiver) -> dict[str, str]:
    """Both routes at the receiver; send-test needs neither the API nor Redis."""
    return {
        "NOTIFIER_SLACK_WEBHOOK_URL": receiver.slack_url,
        "NOTIFIER_WEBHOOK_URL": receiver.webhook_url,
        "NOTIFIER_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }


def verified_webhook(received: Received) -> dict[str, object]:
    """The body of a webhook request, after checking its Standard Webhooks signature."""
    assert received.method == "POST"
    assert received.headers["Content-Type"] == "application/json"
    assert received.headers["User-Agent"].startswith("chamelaion-notifier/")
    payload = Webhook(WEBHOOK_SECRET).verify(received.body, received.headers)
    assert isinstance(payload, dict)
    return payload


@pytest.mark.parametrize("status", ["completed", "failed"])
async def test_send_test_delivers_a_signed_sample_to_every_route(
    status: str, routes_env: dict[str, str], receiver: Receiver
) -> None:
    args = ["send-test"] if status == "completed" else ["send-test", "--status", status]
    result = await notifier(*args, env=routes_env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "route slack (slack): delivered (HTTP 200)",
        "route webhook (webhook): delivered (HTTP 200)",
    ]
    [hook] = receiver.to(WEBHOOK_PATH)
    payload = verified_webhook(hook)
    assert payload["type"] == f"lipsync.request.{status}"
    data = payload["data"]
    assert isinstance(data, dict)
    assert data["status"] == status
    assert (data["error_message"] is not None) == (status == "failed")
    assert hook.headers["webhook-id"]
    [slack] = receiver.to(SLACK_PATH)
    assert slack.method == "POST"
    assert "webhook-signature" not in slack.headers
    message = json.loads(slack.body)
    assert status in message["text"]
    assert message["blocks"]


async def test_send_test_route_sends_only_there_and_each_run_has_a_new_webhook_id(
    routes_env: dict[str, str], receiver: Receiver
) -> None:
    first = await notifier("send-test", "--route", "webhook", env=routes_env)
    second = await notifier("send-test", "--route", "webhook", env=routes_env)

    for result in (first, second):
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines() == ["route webhook (webhook): delivered (HTTP 200)"]
    assert receiver.to(SLACK_PATH) == []
    hooks = receiver.to(WEBHOOK_PATH)
    assert len(hooks) == 2
    bodies = [verified_webhook(hook) for hook in hooks]
    assert [body["type"] for body in bodies] == ["lipsync.request.completed"] * 2
    # A receiver that de-duplicates on webhook-id must not drop the second test.
    assert hooks[0].headers["webhook-id"] != hooks[1].headers["webhook-id"]


@pytest.mark.parametrize(
    ("failing", "status", "outcome"),
    [
        ("webhook", 500, "failed, would be retried: HTTP 500"),
        ("webhook", 400, "failed permanently, would be dead-lettered: HTTP 400"),
        ("slack", 500, "failed, would be retried: HTTP 500"),
        ("slack", 400, "failed permanently, would be dead-lettered: HTTP 400"),
    ],
)
async def test_send_test_failing_route_exits_1_and_the_other_is_still_delivered(
    failing: str, status: int, outcome: str, routes_env: dict[str, str], receiver: Receiver
) -> None:
    paths = {"slack": SLACK_PATH, "webhook": WEBHOOK_PATH}
    receiver.answers[paths[failing]] = status

    result = await notifier("send-test", env=routes_env)

    assert result.returncode == 1, result.stdout + result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert set(lines) == {"route slack (slack)", "route webhook (webhook)"}
    assert lines[f"route {failing} ({failing})"].startswith(outcome), result.stdout
    good = "slack" if failing == "webhook" else "webhook"
    assert lines[f"route {good} ({good})"] == "delivered (HTTP 200)"
    assert len(receiver.to(SLACK_PATH)) == 1
    assert len(receiver.to(WEBHOOK_PATH)) == 1
    verified_webhook(receiver.to(WEBHOOK_PATH)[0])


@pytest.mark.parametrize(
    "kind", [FaultKind.RATE_LIMIT, FaultKind.SERVER_ERROR, FaultKind.INVALID_JSON, FaultKind.HTML]
)
async def test_an_api_that_answers_badly_is_unreachable_not_misconfigured(
    simulator: Simulator, api_url: str, kind: FaultKind
) -> None:
    simulator.inject(Fault(kind, retry_after="30"))
    settings = load_settings({"api_url": api_url, "api_key": SIMULATOR_KEY})
    finding = await check_api(settings)
    assert not finding.passed
    assert not finding.misconfigured  # trying again later can help: exit 1, not 2
    assert SIMULATOR_KEY not in finding.result


# --- batch digests: check and send-test --digest -----------------------------------------

DIGEST_PATH = "/batches"
SLACK_DIGEST_PATH = SLACK_PATH + "-digests"


def digest_config(tmp_path: Path, receiver: Receiver, slack_extra: str = "") -> Path:
    """Two digest routes at the receiver: `batch-hook` (signed webhook) and `batch-channel`."""
    path = tmp_path / "digests.toml"
    path.write_text(
        "[[routes]]\n"
        'name = "batch-hook"\n'
        'type = "webhook"\n'
        f'url = "{receiver.base}{DIGEST_PATH}"\n'
        f'secret = "{WEBHOOK_SECRET}"\n'
        'digest = "reference_id"\n'
        "[[routes]]\n"
        'name = "batch-channel"\n'
        'type = "slack"\n'
        f'url = "{receiver.base}{SLACK_DIGEST_PATH}"\n'
        'digest = "reference_id"\n'
        f"{slack_extra}"
    )
    return path


async def test_check_renders_a_large_sample_digest_for_every_digest_route(
    good_env: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    env = {**good_env, "NOTIFIER_CONFIG": str(digest_config(tmp_path, receiver))}
    result = await notifier("check", env=env)

    assert result.returncode == CHECK_PASSED, result.stdout + result.stderr
    for route, template in [
        ("batch-hook", "webhook/digest.json.j2 (digest of 1000)"),
        ("batch-channel", "slack/digest.json.j2 (digest of 1000)"),
    ]:
        assert "ok: renders" in row(result.stdout, f"route {route}", template)
    assert "digest" not in row(result.stdout, "route slack", "slack/completed")
    assert receiver.requests == []


async def test_check_fails_a_digest_template_that_breaks_slack_limits_at_1000_requests(
    good_env: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    # Every failure in one section: fine for a small batch, over 3,000 characters at 1,000.
    template = tmp_path / "templates" / "slack" / "one-section.json.j2"
    template.parent.mkdir(parents=True)
    template.write_text(
        '{"text": "batch", "blocks": [{"type": "section", "text": {"type": "mrkdwn", '
        '"text": {{ requests | map(attribute="id") | join(", ") | tojson }}}}]}',
        encoding="utf-8",
    )
    extra = 'digest_template = "slack/one-section.json.j2"\n'
    env = {
        **good_env,
        "NOTIFIER_CONFIG": str(digest_config(tmp_path, receiver, extra)),
        "NOTIFIER_TEMPLATES_DIR": str(tmp_path / "templates"),
    }
    result = await notifier("check", env=env)

    assert result.returncode == CHECK_MISCONFIGURED, result.stdout + result.stderr
    line = row(result.stdout, "route batch-channel", "slack/one-section.json.j2 (digest of 1000)")
    assert "FAIL: " in line
    assert "section text is" in line
    assert "Slack's limit is 3000" in line


async def test_send_test_digest_delivers_a_sample_digest_to_every_digest_route_only(
    routes_env: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    env = {**routes_env, "NOTIFIER_CONFIG": str(digest_config(tmp_path, receiver))}
    first = await notifier("send-test", "--digest", env=env)
    second = await notifier("send-test", "--digest", "--route", "batch-hook", env=env)

    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.splitlines() == [
        "route batch-hook (webhook): delivered (HTTP 200)",
        "route batch-channel (slack): delivered (HTTP 200)",
    ]
    assert second.stdout.splitlines() == ["route batch-hook (webhook): delivered (HTTP 200)"]
    assert receiver.to(SLACK_PATH) == receiver.to(WEBHOOK_PATH) == []
    hooks = receiver.to(DIGEST_PATH)
    bodies = [verified_webhook(hook) for hook in hooks]
    assert [body["type"] for body in bodies] == ["lipsync.batch.settled"] * 2
    data = bodies[0]["data"]
    assert isinstance(data, dict)
    assert data["counts"] == {"completed": 10, "failed": 2}
    assert hooks[0].headers["webhook-id"] != hooks[1].headers["webhook-id"]
    [slack] = receiver.to(SLACK_DIGEST_PATH)
    assert "settled: 10 completed, 2 failed" in json.loads(slack.body)["text"]


@pytest.mark.parametrize("route", [None, "webhook"])
async def test_send_test_digest_without_a_digest_route_exits_2_saying_so(
    routes_env: dict[str, str], route: str | None
) -> None:
    args = ["send-test", "--digest", *(["--route", route] if route else [])]
    result = await notifier(*args, env=routes_env)

    assert result.returncode == 2
    expected = "route 'webhook' is not a digest route" if route else "no route is a digest route"
    assert expected in result.stderr
    assert 'digest = "reference_id"' in result.stderr


async def test_send_test_rejects_digest_and_status_together(routes_env: dict[str, str]) -> None:
    result = await notifier("send-test", "--digest", "--status", "failed", env=routes_env)
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
