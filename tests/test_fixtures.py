"""The Redis fixture itself: both backends run Lua with cjson; the real server is ours."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import redis
import redis.asyncio

from notifier.keys import Keys

SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local stored = redis.call('HGET', KEYS[1], ARGV[1])
local decoded = cjson.decode(ARGV[3])
return cjson.encode({field = ARGV[1], value = stored, size = redis.call('HLEN', KEYS[1]),
                     echoed = decoded.nested[2]})
"""


async def test_a_lua_script_with_cjson_runs_on_both_backends(
    redis_client: redis.asyncio.Redis,
) -> None:
    script = redis_client.register_script(SCRIPT)
    key = Keys("test").state_of("req-1")
    reply = await script(
        keys=[key], args=["req-1", "completed", json.dumps({"nested": [1, "two"]})]
    )
    assert json.loads(reply) == {"field": "req-1", "value": "completed", "size": 1, "echoed": "two"}
    assert await redis_client.hget(key, "req-1") == "completed"


async def test_clients_of_one_factory_share_one_empty_redis(redis_factory) -> None:
    first, second = redis_factory(), redis_factory()
    assert await first.dbsize() == 0
    await first.set("shared", "yes")
    assert await second.get("shared") == "yes"


def test_the_real_server_is_ours_and_forgets_on_restart(redis_server) -> None:
    assert redis_server.port != 6379
    with redis.Redis(port=redis_server.port) as client:
        client.set("before-restart", 1)
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
    redis_server.stop()
    redis_server.start()
    with redis.Redis(port=redis_server.port) as client:
        assert client.get("before-restart") is None


INNER_TEST = """
async def test_uses_redis(redis_client):
    assert await redis_client.ping()
"""


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [("", {"passed": 1, "skipped": 1}), ("true", {"passed": 1, "errors": 1})],
)
def test_without_redis_server_the_real_tests_skip_only_outside_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, outcome: dict[str, int]
) -> None:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(samples=(Path(__file__).parent / "samples.py").read_text())
    pytester.makepyfile(receiver=(Path(__file__).parent / "receiver.py").read_text())
    pytester.makeini(
        textwrap.dedent("""
            [pytest]
            asyncio_mode = auto
            asyncio_default_fixture_loop_scope = function
        """)
    )
    pytester.makepyfile(INNER_TEST)
    monkeypatch.setenv("PATH", str(pytester.path))  # no redis-server on it
    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(**outcome)
