"""The command line: every command exists, bad input exits 2 with one paragraph, nothing leaks."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from notifier import __version__
from notifier.cli import build_parser, main

from conftest import RedisServer

API_KEY = "sk-live-ZZLEAK-api-key"
SLACK_URL = "https://hooks.slack.com/services/T00/B00/ZZLEAK-slack-token"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"ZZLEAK-signing-key-bytes").decode()
SECRETS = (API_KEY, SLACK_URL, "ZZLEAK-slack-token", WEBHOOK_SECRET, "ZZLEAK")

CONFIGURED = {
    "NOTIFIER_API_KEY": API_KEY,
    "NOTIFIER_SLACK_WEBHOOK_URL": SLACK_URL,
    "NOTIFIER_WEBHOOK_URL": "http://127.0.0.1:9/hook",
    "NOTIFIER_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "NOTIFIER_REDIS_URL": "redis://127.0.0.1:1/0",  # never contacted by these commands
}

COMMANDS = [
    ["run"],
    ["once"],
    ["check"],
    ["send-test"],
    ["dlq"],
    ["dlq", "list"],
    ["dlq", "replay"],
    ["demo"],
]


def notifier(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m notifier` as a user would, with only the given NOTIFIER_* variables."""
    return subprocess.run(
        [sys.executable, "-m", "notifier", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_paragraph_without_secrets(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, nothing on stdout, one paragraph on stderr, no traceback, no secret."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    message = result.stderr
    assert message.endswith("\n")
    assert "\n" not in message.rstrip("\n"), message
    assert "Traceback" not in message
    for secret in SECRETS:
        assert secret not in message
    return message


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert f"usage: notifier {' '.join(command)}" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"notifier {__version__}"


def test_help_lists_every_setting_flag_with_its_environment_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--poll-interval N" in out
    assert "[NOTIFIER_POLL_INTERVAL]" in out
    assert "--notify-existing [BOOL]" in out


def test_setting_flags_work_before_and_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["--page-size", "5", "run"]).page_size == "5"
    assert parser.parse_args(["run", "--page-size", "5"]).page_size == "5"
    assert parser.parse_args(["run", "--notify-existing"]).notify_existing == "true"
    assert parser.parse_args(["run", "--notify-existing", "false"]).notify_existing == "false"
    assert not hasattr(parser.parse_args(["run"]), "page_size")


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("notifier")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert "usage: notifier" in result.stdout


BAD_ROUTE = '[[routes]]\nname = "ops"\ntype = "webhook"\nurl = "ftp://x.test"\n'


@pytest.mark.parametrize(
    ("args", "env", "config", "fragment"),
    [
        (["run"], {"NOTIFIER_POLL_INTERVAL": "abc"}, None, "NOTIFIER_POLL_INTERVAL = 'abc'"),
        (["run", "--page-size", "x"], {}, None, "--page-size = 'x'"),
        (["run"], {}, 'page_size = "x"\n', "page_size in "),
        (["run"], {}, "pagesize = 5\n", "unknown key 'pagesize'"),
        (["run"], {}, BAD_ROUTE, "[[routes]] #1 ('ops')"),
        (["run"], {"NOTIFIER_CONFIG": "/nonexistent/notifier.toml"}, None, "cannot read"),
        (["run"], {}, "poll_interval = = 1\n", "is not valid TOML"),
        (["run"], {"NOTIFIER_WEBHOOK_SECRET": "ZZLEAK-no-prefix"}, None, "NOTIFIER_WEBHOOK_SECRET"),
        (
            ["run"],
            {"NOTIFIER_SLACK_WEBHOOK_URL": "ftp://hooks.slack.com/ZZLEAK"},
            None,
            "NOTIFIER_SLACK_WEBHOOK_URL",
        ),
        (["once"], {"NOTIFIER_REDIS_URL": ""}, None, "NOTIFIER_REDIS_URL is not set"),
        (["dlq", "list"], {"NOTIFIER_REDIS_URL": ""}, None, "NOTIFIER_REDIS_URL is not set"),
        (["dlq", "replay"], {}, None, "give dead-letter IDs or --all"),
        (["dlq", "replay", "--all", "1-0"], {}, None, "give dead-letter IDs or --all"),
        (["send-test", "--route", "nope"], {}, None, "the routes are: slack, webhook"),
        (["send-test", "--status", "queued"], {}, None, "invalid choice: 'queued'"),
        (["run", "--bogus"], {}, None, "unrecognized arguments: --bogus"),
        ([], {}, None, "the following arguments are required: COMMAND"),
    ],
)
def test_bad_input_exits_2_with_one_paragraph_naming_it(
    tmp_path: Path, args: list[str], env: dict[str, str], config: str | None, fragment: str
) -> None:
    env = {**CONFIGURED, **env}
    if config is not None:
        (tmp_path / "notifier.toml").write_text(config)
        env["NOTIFIER_CONFIG"] = str(tmp_path / "notifier.toml")
    message = assert_one_paragraph_without_secrets(notifier(*args, env=env, cwd=tmp_path))
    assert fragment in message


def test_missing_api_key_exits_2() -> None:
    message = assert_one_paragraph_without_secrets(
        notifier("run", env={**CONFIGURED, "NOTIFIER_API_KEY": ""})
    )
    assert "NOTIFIER_API_KEY is not set" in message


def test_the_chamelaion_api_key_alias_alone_is_enough() -> None:
    env = {**CONFIGURED, "NOTIFIER_API_KEY": "", "CHAMELAION_API_KEY": API_KEY}
    result = notifier("once", env=env)  # past configuration, into a cycle that fails
    assert result.returncode == 1, result.stderr
    assert "cycle: failed" in result.stdout


def test_send_test_without_routes_exits_2() -> None:
    message = assert_one_paragraph_without_secrets(
        notifier("send-test", env={"NOTIFIER_API_KEY": API_KEY})
    )
    assert "no route is configured" in message


# Redis: a malformed URL, refused credentials and an unreachable server are said in one
# paragraph by every command that uses it, never with a traceback or the password.

MALFORMED_REDIS_URLS = {
    "redis://:ZZLEAK-pw@127.0.0.1:99999/0": "Port out of range",
    "redis://:ZZLEAK-pw@127.0.0.1:6390/0?db=abc": "Invalid value for 'db'",
    "redis://:ZZLEAK-pw@127.0.0.1:6390/notadb": "must be a database number",
    "redis://:ZZLEAK-pw@:6390/0": "must name the Redis host",
    "http://:ZZLEAK-pw@127.0.0.1:6390/0": "must be a redis://, rediss:// or unix:// URL",
}
REDIS_COMMANDS = [["run"], ["once"], ["check"], ["send-test"], ["dlq", "list"]]


@pytest.mark.parametrize("command", REDIS_COMMANDS, ids=" ".join)
@pytest.mark.parametrize(("url", "fragment"), MALFORMED_REDIS_URLS.items())
def test_a_malformed_redis_url_exits_2_in_every_command(
    command: list[str], url: str, fragment: str
) -> None:
    result = notifier(*command, env={**CONFIGURED, "NOTIFIER_REDIS_URL": url})
    message = assert_one_paragraph_without_secrets(result)
    assert "NOTIFIER_REDIS_URL" in message
    assert fragment in message


@pytest.mark.parametrize(
    "command", [["once"], ["dlq", "list"], ["dlq", "replay", "--all"]], ids=" ".join
)
def test_credentials_redis_refuses_exit_2_naming_the_setting(
    redis_with_password: RedisServer, command: list[str]
) -> None:
    url = redis_with_password.url.replace("ZZLEAK-right-pw", "ZZLEAK-wrong-pw")
    result = notifier(*command, env={**CONFIGURED, "NOTIFIER_REDIS_URL": url})
    message = assert_one_paragraph_without_secrets(result)
    assert "Redis refused the credentials of NOTIFIER_REDIS_URL" in message


@pytest.mark.parametrize("command", [["dlq", "list"], ["dlq", "replay", "--all"]], ids=" ".join)
def test_an_unreachable_redis_exits_1_with_one_paragraph(command: list[str]) -> None:
    result = notifier(*command, env=CONFIGURED)  # port 1: nothing listens
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("notifier: Redis is unreachable (")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
