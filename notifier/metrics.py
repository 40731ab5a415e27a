"""Prometheus metrics of one `notifier run` process, served on `/metrics`.

Counters and histograms are updated where things happen (the API client, the poller, the
workers); gauges of what waits in Redis are read when Prometheus scrapes, so they are
never stale. Labels carry route names and statuses only: never a URL or a secret.
"""

from __future__ import annotations

import logging

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from redis.exceptions import RedisError

from notifier import __version__
from notifier.queue import RouteQueue
from notifier.store import Store

log = logging.getLogger(__name__)

# Detection to delivery: a second or two normally, minutes while a receiver is down.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
# Delivery outcomes as the worker's tally names them -> metric labels.
OUTCOME_LABELS = {"dead": "dead_lettered"}
CYCLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Every metric of the process, in a registry of its own (tests run several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        Info("notifier_build", "Version of the notifier", registry=r).info({"version": __version__})
        self.cycles = Counter(
            "notifier_poll_cycles", "Poll cycles by outcome", ["outcome"], registry=r
        )
        self.cycle_seconds = Histogram(
            "notifier_poll_cycle_duration_seconds",
            "Duration of completed poll cycles",
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self.sweeps = Counter(
            "notifier_sweeps",
            "How completed poll cycles read the listing: full, incremental (the head, the "
            "unfinished requests' pages and a slice of the safety net), or an incremental "
            "cycle rejected because the listing did not hold what it predicted (a full one "
            "followed)",
            ["kind"],
            registry=r,
        )
        self.safety_net_pages = Counter(
            "notifier_safety_net_pages",
            "Pages the safety net read: over NOTIFIER_SAFETY_NET_PERIOD, the whole listing",
            registry=r,
        )
        self.gone = Counter(
            "notifier_unfinished_gone",
            "Unfinished requests the listing no longer held (deleted): no longer looked for",
            registry=r,
        )
        self.api_calls = Counter(
            "notifier_api_calls", "Calls to the Chamelaion API by outcome", ["outcome"], registry=r
        )
        self.malformed_items = Counter(
            "notifier_api_malformed_items",
            "List items skipped because a field is missing, unreadable or implausible "
            "(a timestamp before 1970 or more than 24 h ahead); counted each time listed",
            registry=r,
        )
        self.transitions = Counter(
            "notifier_transitions",
            "Status changes seen by the poller, by new status (not counting a baseline)",
            ["status"],
            registry=r,
        )
        self.events = Counter("notifier_events_queued", "Events appended to the outbox", registry=r)
        self.digests = Counter(
            "notifier_digests_queued", "Batch digests appended to the outbox", registry=r
        )
        self.silenced = Counter(
            "notifier_requests_recorded_silently",
            "Old requests first seen finished after the baseline: recorded, not notified",
            registry=r,
        )
        self.rebaselines = Counter(
            "notifier_rebaselines",
            "Times Redis lost its data and the poller started a new baseline",
            registry=r,
        )
        self.deliveries = Counter(
            "notifier_deliveries",
            "Delivery attempts by route and outcome",
            ["route", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "notifier_delivery_latency_seconds",
            "From detecting a transition to its successful delivery",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.leader = Gauge(
            "notifier_poller_leader", "1 while this process holds the polling lease", registry=r
        )
        self.redis_up = Gauge(
            "notifier_redis_up", "1 if Redis answered the last scrape", registry=r
        )
        self.last_cycle = Gauge(
            "notifier_last_cycle_timestamp_seconds",
            "When some replica last completed a poll cycle (unix time)",
            registry=r,
        )
        self.outbox = Gauge("notifier_outbox_entries", "Entries in the outbox stream", registry=r)
        self.backlog = Gauge(
            "notifier_delivery_backlog",
            "Deliveries still to send, by route and where they wait",
            ["route", "state"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "notifier_dead_letters", "Entries in the dead-letter stream", registry=r
        )
        self.tracked = Gauge("notifier_tracked_requests", "Requests with stored state", registry=r)
        self.unfinished = Gauge(
            "notifier_unfinished_requests",
            "Requests last seen unfinished: every poll cycle reads the page of each",
            registry=r,
        )

    def delivered(self, route: str, outcome: str, latency_s: float | None) -> None:
        """Count one resolved delivery; `latency_s` for a successful one."""
        self.deliveries.labels(route, OUTCOME_LABELS.get(outcome, outcome)).inc()
        if latency_s is not None:
            self.latency.labels(route).observe(max(0.0, latency_s))

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    async def read_redis(self, store: Store, queues: list[RouteQueue]) -> None:
        """Refresh the gauges of what waits in Redis; on failure keep the last values and
        report Redis down."""
        keys = store.keys
        try:
            async with store.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(keys.outbox).xlen(keys.dead_letters).get(keys.last_cycle)
                pipe.hlen(keys.unfinished)
                outbox, dead, last_cycle, unfinished = await pipe.execute()
            backlogs = {queue.route: await queue.backlog() for queue in queues}
            tracked = await store.tracked()
        except (RedisError, OSError) as exc:
            log.debug("metrics could not read Redis: %s", exc)
            self.redis_up.set(0)
            return
        self.redis_up.set(1)
        self.outbox.set(outbox)
        self.dead_letters.set(dead)
        self.tracked.set(tracked)
        self.unfinished.set(unfinished)
        if last_cycle:
            self.last_cycle.set(int(last_cycle) / 1000)
        for route, backlog in backlogs.items():
            for state in ("retries", "pending", "unread"):
                self.backlog.labels(route, state).set(getattr(backlog, state))
