"""The key registry: one hash-tagged namespace per deployment, one Cluster slot for all keys."""

from __future__ import annotations

import inspect
import uuid
from functools import cached_property

import pytest
from redis.crc import key_slot

from notifier.keys import STATE_BUCKETS, Keys

SLACK_URL = "https://hooks.slack.com/services/T00/B00/slack-token"
SAMPLE_ARGUMENTS = {
    "bucket": 17,
    "request_id": str(uuid.uuid4()),
    "consumer": "host-1:42",
    "url": SLACK_URL,
    "route": "ops-webhook",
    # Braces in a reference_id must not move the key out of the prefix's slot.
    "reference_id": "order-{12345}:japanese dub",
}


def every_key(keys: Keys) -> list[str]:
    """Every key the registry can name: each property, and each method with sample arguments."""
    names = []
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_") or name == "prefix":
            continue
        if isinstance(member, cached_property):
            names.append(getattr(keys, name))
        else:
            parameters = list(inspect.signature(member).parameters)[1:]
            names.append(getattr(keys, name)(*(SAMPLE_ARGUMENTS[p] for p in parameters)))
    return names


def test_the_enumeration_sees_fixed_keys_and_key_families() -> None:
    keys = Keys("notifier")
    found = every_key(keys)
    assert keys.outbox in found
    assert keys.state_of(SAMPLE_ARGUMENTS["request_id"]) in found
    assert keys.slack_slot(SLACK_URL) in found


@pytest.mark.parametrize("prefix", ["notifier", "team-b", "prod:eu.1", "x"])
def test_every_key_shares_one_cluster_slot(prefix: str) -> None:
    keys = every_key(Keys(prefix))
    assert all(key.startswith(f"{{{prefix}}}:") for key in keys)
    assert {key_slot(key.encode()) for key in keys} == {key_slot(prefix.encode())}


def test_two_prefixes_never_share_a_key() -> None:
    assert not set(every_key(Keys("a"))) & set(every_key(Keys("b")))


def test_all_names_are_distinct() -> None:
    keys = every_key(Keys("notifier"))
    assert len(set(keys)) == len(keys)


def test_a_slack_slot_is_named_without_the_secret_url() -> None:
    keys = Keys("notifier")
    slot = keys.slack_slot(SLACK_URL)
    assert "slack-token" not in slot
    assert "hooks.slack.com" not in slot
    assert slot == keys.slack_slot(SLACK_URL)
    assert slot != keys.slack_slot(SLACK_URL + "x")


def test_requests_spread_over_the_state_buckets_stably() -> None:
    keys = Keys("notifier")
    ids = [str(uuid.UUID(int=n * 7919 + 12345)) for n in range(20_000)]
    buckets = {keys.state_of(request_id) for request_id in ids}
    assert len(buckets) > STATE_BUCKETS * 0.95
    assert keys.state_of(ids[0]) == Keys("notifier").state_of(ids[0])


@pytest.mark.parametrize("bucket", [-1, STATE_BUCKETS])
def test_a_bucket_outside_the_range_is_refused(bucket: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        Keys("notifier").state(bucket)
