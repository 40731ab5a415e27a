"""The `notifier` command line: parse flags, load settings, run a command, map errors to exit codes.

Every setting has a flag, accepted before or after the command name. Configuration
and usage errors end with exit code 2 and one paragraph on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

from notifier import __version__
from notifier.config import ConfigError, Route, Settings, env_name, flag_name, load_settings
from notifier.logs import configure_logging
from notifier.models import COMPLETED, FINISHED

# Exit codes of the contract: 0 done, 1 the poll cycle failed (API or Redis down),
# 2 configuration or usage error or a rejected API key, 3 work left or dead-lettered.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

SAMPLE_STATUSES = tuple(sorted(FINISHED))  # what send-test can send

log = logging.getLogger(__name__)
T = TypeVar("T")

Handler = Callable[[argparse.Namespace, dict[str, Any]], int]


class UsageError(Exception):
    """The command line itself is wrong: an unknown flag, a missing argument."""


class Unavailable(Exception):
    """A service the command needs cannot be reached now: exit 1, and try again later."""


async def _with_redis(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """`work(client)` on a client of the configured Redis, closed afterwards; Redis failures
    become a configuration error (credentials) or `Unavailable`, never a traceback."""
    from redis.exceptions import RedisError  # noqa: PLC0415 - commands import what they need

    from notifier.outages import reason  # noqa: PLC0415
    from notifier.store import REDIS_REFUSED, credentials_refused, open_redis  # noqa: PLC0415

    client = open_redis(settings)
    try:
        return await work(client)
    except REDIS_REFUSED as exc:
        raise credentials_refused(exc) from None
    except (RedisError, OSError) as exc:
        raise Unavailable(
            f"Redis is unreachable ({reason(exc)}); check {env_name('redis_url')} and that "
            f"Redis is running, then try again."
        ) from None
    finally:
        await client.aclose()


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage, so main() reports it once."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _load(flags: dict[str, Any]) -> Settings:
    """The settings, and log lines in their format with their secrets blanked."""
    settings = load_settings(flags)
    configure_logging(settings)
    return settings


def _require_redis(settings: Settings, command: str, why: str) -> None:
    settings.require("redis_url", f"notifier {command} {why}")


def _configured_routes(settings: Settings, name: str | None) -> list[Route]:
    if not settings.routes:
        raise ConfigError(
            f"no route is configured: set {env_name('slack_webhook_url')} or "
            f"{env_name('webhook_url')}, or add [[routes]] to the TOML file."
        )
    if name is None:
        return settings.routes
    chosen = [route for route in settings.routes if route.name == name]
    if not chosen:
        known = ", ".join(route.name for route in settings.routes)
        raise ConfigError(f"--route {name!r} names no configured route; the routes are: {known}.")
    return chosen


def _digest_routes(routes: list[Route], name: str | None) -> list[Route]:
    chosen = [route for route in routes if route.digest is not None]
    if not chosen:
        which = f"route {name!r} is not a digest route" if name else "no route is a digest route"
        raise ConfigError(
            f'send-test --digest: {which}; set digest = "reference_id" on a [[routes]] table.'
        )
    return chosen


def _run(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from notifier.api import AuthError  # noqa: PLC0415 - commands import what they need
    from notifier.check import check_routes  # noqa: PLC0415
    from notifier.service import run_service  # noqa: PLC0415

    settings = _load(flags)
    settings.require("api_key", "notifier run polls the Chamelaion API")
    _configured_routes(settings, None)
    # A template that cannot render would dead-letter every event of its route: refuse to
    # start instead, as `check` would have said.
    if broken := [finding.result for finding in check_routes(settings) if not finding.passed]:
        raise ConfigError(
            f"{'; '.join(broken)}. notifier run renders every route's templates with sample "
            f"data before it starts; fix the template (notifier check shows every route)."
        )
    try:
        return asyncio.run(run_service(settings))
    except AuthError as exc:
        raise ConfigError(f"{exc}; check {env_name('api_key')}.") from None


def _once(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from notifier.api import AuthError  # noqa: PLC0415 - commands import what they need
    from notifier.once import run_once  # noqa: PLC0415
    from notifier.store import REDIS_REFUSED, credentials_refused  # noqa: PLC0415

    settings = _load(flags)
    _require_redis(
        settings,
        "once",
        "keeps what it has seen and sent in Redis; with the in-memory store every run "
        "would be a silent baseline that never notifies",
    )
    settings.require("api_key", "notifier once polls the Chamelaion API")
    _configured_routes(settings, None)
    try:
        report = asyncio.run(run_once(settings))
    except AuthError as exc:
        raise ConfigError(f"{exc}; check {env_name('api_key')}.") from None
    except REDIS_REFUSED as exc:
        raise credentials_refused(exc) from None
    print(report.summary())
    return report.exit_code()


def _check(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from notifier import check  # noqa: PLC0415 - commands import what they need

    settings = _load(flags)
    settings.require("api_key", "notifier check calls the Chamelaion API once")
    findings = asyncio.run(check.run_check(settings))
    print(check.findings_table(findings))
    return check.check_exit_code(findings)


def _send_test(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from notifier import check  # noqa: PLC0415 - commands import what they need

    settings = _load(flags)
    routes = _configured_routes(settings, args.route)
    if args.digest:
        routes = _digest_routes(routes, args.route)
    sent = asyncio.run(check.send_tests(settings, routes, args.status, digest=args.digest))
    print("\n".join(test.line() for test in sent))
    return 0 if all(test.delivered for test in sent) else EXIT_FAILED


def _dlq_list(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from notifier import dlq  # noqa: PLC0415 - commands import what they need
    from notifier.keys import Keys  # noqa: PLC0415
    from notifier.redact import Redactor, secrets_of  # noqa: PLC0415

    settings = _load(flags)
    _require_redis(settings, "dlq", "reads the dead letters kept in Redis")
    # A dead letter quotes what a receiver said, recorded under an older configuration
    # maybe: blank this one's secrets in it too.
    redact = Redactor(secrets_of(settings))

    async def list_all(client: Any) -> None:
        async for dead_letter in dlq.DeadLetters(client, Keys(settings.key_prefix)).all():
            print(redact(json.dumps(dead_letter.as_json(), ensure_ascii=False)))

    asyncio.run(_with_redis(settings, list_all))
    return 0


def _dlq_replay(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from notifier import dlq  # noqa: PLC0415 - commands import what they need
    from notifier.keys import Keys  # noqa: PLC0415

    if bool(args.ids) == args.all:
        raise UsageError("notifier dlq replay: give dead-letter IDs or --all, not both or neither")
    settings = _load(flags)
    _require_redis(settings, "dlq", "re-queues the dead letters kept in Redis")
    routes = [route.name for route in settings.routes]

    async def replay(client: Any) -> dlq.Replayed:
        letters = dlq.DeadLetters(client, Keys(settings.key_prefix))
        return await letters.replay(None if args.all else args.ids, routes)

    done = asyncio.run(_with_redis(settings, replay))
    for dead_letter in done.replayed:
        print(f"replayed {dead_letter.id} to route {dead_letter.route}")
    if done.unrouted:
        names = ", ".join(sorted({d.route for d in done.unrouted}))
        print(
            f"notifier dlq replay: kept {len(done.unrouted)} dead letters of routes this "
            f"configuration lacks ({names}); add the routes back to replay them.",
            file=sys.stderr,
        )
    if done.missing:
        others = f"; the other {len(done.replayed)} were replayed" if done.replayed else ""
        raise ConfigError(
            f"no dead letter with id {', '.join(done.missing)} (see notifier dlq list){others}."
        )
    return EXIT_USAGE if done.unrouted else 0


def _healthcheck(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from notifier.service import probe_health  # noqa: PLC0415 - commands import what they need

    settings = load_settings(flags)  # no log lines: a probe's output is its one line
    healthy, said = probe_health(settings)
    print(said, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else EXIT_FAILED


def _demo(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from notifier.demo import (  # noqa: PLC0415 - commands import what they need
        DemoInterrupted,
        DemoStalled,
        run_demo,
    )

    # The demo's story is its output; the service's routine lines would drown it.
    configure_logging(None, level=logging.WARNING)
    try:
        asyncio.run(run_demo(sys.stdout))
    except DemoStalled as exc:
        print(f"notifier demo: {exc}; see the warnings above.", file=sys.stderr)
        return EXIT_FAILED
    except (DemoInterrupted, KeyboardInterrupt):  # Ctrl-C while the story runs, or before
        return EXIT_INTERRUPTED
    return 0


def _settings_flags() -> argparse.ArgumentParser:
    """A parent parser with one flag per setting; absent flags stay absent (SUPPRESS)."""
    parser = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    group = parser.add_argument_group("settings (flag > environment > TOML file > default)")
    for name, field in Settings.model_fields.items():
        if name == "routes":  # TOML only
            continue
        default = "" if field.default is None else f" (default: {_show_default(field.default)})"
        help_text = f"{field.description}{default} [{env_name(name)}]".replace("%", "%%")
        if field.annotation is bool:
            group.add_argument(
                flag_name(name), dest=name, nargs="?", const="true", metavar="BOOL", help=help_text
            )
        else:
            metavar = "N" if field.annotation in (int, float) else "VALUE"
            group.add_argument(flag_name(name), dest=name, metavar=metavar, help=help_text)
    return parser


def _show_default(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line, with every command and setting flag."""
    settings = _settings_flags()
    parser = _Parser(
        prog="notifier",
        description="Watch Chamelaion lip sync requests and notify Slack and webhooks.",
        parents=[settings],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(group: Any, name: str, handler: Handler | None, summary: str, **kw: Any) -> Any:
        sub = group.add_parser(
            name, help=summary, description=summary, parents=kw.pop("parents", [settings]), **kw
        )
        sub.set_defaults(handler=handler)
        return sub

    add(commands, "run", _run, "poll forever and deliver; stops cleanly on SIGTERM/SIGINT")
    add(
        commands,
        "once",
        _once,
        "one poll cycle, then one delivery pass; exit 0 all sent, 3 work left or "
        "dead-lettered, 1 cycle failed, 2 configuration error",
    )
    add(
        commands, "check", _check, "validate settings, routes and templates; ping Redis and the API"
    )
    send = add(commands, "send-test", _send_test, "deliver a sample notification now")
    send.add_argument("--route", metavar="NAME", help="only this route (default: every route)")
    sample = send.add_mutually_exclusive_group()
    sample.add_argument("--status", choices=SAMPLE_STATUSES, default=COMPLETED)
    sample.add_argument(
        "--digest", action="store_true", help="a sample batch digest, to every digest route"
    )
    dlq = add(commands, "dlq", None, "list and replay dead letters")
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    add(actions, "list", _dlq_list, "print one JSON object per dead letter")
    replay = add(actions, "replay", _dlq_replay, "re-queue dead letters with attempts reset")
    replay.add_argument("ids", nargs="*", metavar="ID", help="dead-letter ids from dlq list")
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    add(
        commands,
        "healthcheck",
        _healthcheck,
        "probe /healthz of the notifier running here, on its configured port (for Docker's "
        "HEALTHCHECK); exit 0 if it answers",
    )
    add(
        commands,
        "demo",
        _demo,
        "a tour of the whole flow: simulated API, in-memory store, console output",
        parents=[],
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    try:
        args = build_parser().parse_args(argv)
        flags = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
        return args.handler(args, flags)
    except UsageError as exc:
        print(exc, file=sys.stderr)
    except ConfigError as exc:
        print(f"notifier: {exc}", file=sys.stderr)
    except Unavailable as exc:
        print(f"notifier: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`notifier dlq list | head`): that is its choice, not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception:
        # A bug of ours: its trace goes through the log formatter, which blanks secrets.
        log.critical("notifier stopped on an internal error; please report it", exc_info=True)
        return EXIT_FAILED
    return EXIT_USAGE
