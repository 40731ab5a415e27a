"""The crash-test wrapper: `notifier once` that dies just before its Nth Redis command.

Run as `python tests/crashing.py N` with the NOTIFIER_* environment of the run. Every
Redis command the process sends counts one (a Lua script is one EVALSHA, a pipeline one
command); just before command number N is sent, the process ends with `os._exit(17)`:
no cleanup, no `finally`, no lease release or heartbeat delete, as if it were killed.
N = 0 never crashes. The timers are shortened so a test can restart at once: a dead
worker's heartbeat lasts 0.3 s and a dead poller's lease 0.5 s (with a poll interval
of 0.1 s).

The last line on stderr starts with `CRASHPOINT ` and holds JSON: where it crashed
(`crashed`, `command`, `phase`) or, when it ran to the end, how many commands it sent
and its exit code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from importlib.resources import files
from typing import Any

import redis.asyncio.client

import notifier.cli
import notifier.delivery
import notifier.lease
import notifier.once

CRASH_EXIT = 17
MARK = "CRASHPOINT "

crash_at = int(sys.argv[1]) if len(sys.argv) > 1 else 0
sent = 0
phase = "start"


def _script_names() -> dict[str, str]:
    """SHA1 -> script name, for every script with and without the common helpers."""
    scripts = files("notifier").joinpath("scripts")
    common = scripts.joinpath("common.lua").read_text()
    names = {}
    for script in scripts.iterdir():
        if script.name.endswith(".lua"):
            text = script.read_text()
            name = script.name.removesuffix(".lua")
            for variant in (text, common + text):
                names[hashlib.sha1(variant.encode()).hexdigest()] = name  # noqa: S324
    return names


SCRIPTS = _script_names()


def _report(**facts: Any) -> None:
    # os.write: os._exit flushes nothing, and this line must reach the test.
    os.write(2, (MARK + json.dumps(facts) + "\n").encode())


def _describe(args: tuple[Any, ...]) -> str:
    name = str(args[0]).upper()
    if name == "EVALSHA":
        return f"EVALSHA {SCRIPTS.get(str(args[1]), args[1])}"
    return name


def _count(command: str) -> None:
    global sent  # noqa: PLW0603 - one counter for the whole process
    sent += 1
    if sent == crash_at:
        _report(crashed=sent, command=command, phase=phase)
        os._exit(CRASH_EXIT)


def _patch_redis() -> None:
    execute_command = redis.asyncio.client.Redis.execute_command
    execute = redis.asyncio.client.Pipeline.execute

    @functools.wraps(execute_command)
    async def counted_command(self: Any, *args: Any, **options: Any) -> Any:
        _count(_describe(args))
        return await execute_command(self, *args, **options)

    @functools.wraps(execute)
    async def counted_pipeline(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.command_stack:  # an empty pipeline sends nothing
            names = sorted({_describe(command) for command, _ in self.command_stack})
            _count(f"PIPELINE {'+'.join(names)}")
        return await execute(self, *args, **kwargs)

    redis.asyncio.client.Redis.execute_command = counted_command  # type: ignore[method-assign]
    redis.asyncio.client.Pipeline.execute = counted_pipeline  # type: ignore[method-assign]


def _track_phases() -> None:
    """Name the phase each command belongs to: the poll cycle or the delivery pass."""
    cycle, deliver = notifier.once._cycle, notifier.once._deliver

    async def in_cycle(*args: Any) -> Any:
        global phase  # noqa: PLW0603
        phase = "cycle"
        return await cycle(*args)

    async def in_delivery(*args: Any) -> Any:
        global phase  # noqa: PLW0603
        phase = "delivery"
        return await deliver(*args)

    notifier.once._cycle = in_cycle
    notifier.once._deliver = in_delivery


def main() -> int:
    """Run `notifier once` with the crash point armed."""
    _patch_redis()
    _track_phases()
    notifier.delivery.HEARTBEAT_TTL_S = 0.3
    notifier.lease.MIN_TTL_S = 0.5
    code = notifier.cli.main(["once"])
    _report(crashed=None, commands=sent, exit=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
