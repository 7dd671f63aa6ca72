"""Every Redis key name bilevel uses, built in one place.

All keys of one deployment share the hash tag `{namespace}`. The Lua scripts move a job between the
ingress, its queue, the lease set and the dead-letter set in one atomic step; Redis (and Redis Cluster)
only runs a script atomically over keys of one slot, so a tag per queue would turn every routing and
every move between queues into a two-phase protocol. One tag per namespace keeps each transition a
single script; a Redis Cluster holds a deployment on one slot, and several namespaces spread over it.
The scripts build per-job keys from `prefix` themselves, which is cluster-safe because of that tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Queue names and namespaces end up inside key names and log lines: keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")

# The dead-letter set of jobs that never reached a queue (unroutable or corrupt in the ingress), or
# whose queue is not known (a corrupt record found outside any queue's sets).
# '~' is not allowed in queue names, so it cannot clash with a real queue.
INGRESS_QUEUE = "~ingress"

# The published controller state outlives a few missed ticks, not a stopped service: a reader seeing
# no state knows no controller has ticked for this long.
ALLOCATION_TTL_S = 30.0
# Allocation changes kept in Redis: enough for a demo's plot of several minutes at one move a tick.
ALLOCATION_HISTORY_LEN = 2000
# Jobs kept per queue in its finished index (`Keys.finished`), newest first: enough to look back
# over the last few minutes of a busy queue, at about 50 bytes an entry (0.5 MB a queue). Every
# FINISHED_TRIM_EVERY entries the list is cut to this length and the oldest entries whose record
# has expired are popped, so a finished job costs one LPUSH more (mirrored in _common.lua).
FINISHED_INDEX_LEN = 10_000
FINISHED_TRIM_EVERY = 64
# Events kept in a job record's `history` field (failed attempts, expired leases, replays): a job
# that fails a hundred times keeps a record of bounded size (mirrored in _common.lua).
HISTORY_LEN = 20


def validate_name(kind: str, name: str) -> str:
    """Return `name` if it is a valid queue name or namespace, else raise ValueError naming it."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"{kind} {name!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ . - "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one namespace; `prefix` is what the Lua scripts receive as KEYS[1]."""

    namespace: str = "default"

    def __post_init__(self) -> None:
        validate_name("namespace", self.namespace)

    @property
    def prefix(self) -> str:
        # The braces are the Redis Cluster hash tag: every key below lands on one slot.
        return f"bilevel:{{{self.namespace}}}:"

    def job(self, job_id: str) -> str:
        """HASH: one job's record (spec, status, queue, times, lease, result or error, and its
        `history`: one JSON event per line, the newest HISTORY_LEN)."""
        return f"{self.prefix}job:{job_id}"

    def waiters(self, job_id: str) -> str:
        """SET: ids of the clients waiting for this job's result; told once, when it finishes."""
        return f"{self.prefix}waiters:{job_id}"

    def inbox(self, client_id: str) -> str:
        """LIST: ids of finished jobs one client waits for. The client blocks on it with one
        connection, however many results it awaits; it expires when the client is gone."""
        return f"{self.prefix}inbox:{client_id}"

    def stream(self, job_id: str) -> str:
        """STREAM: the chunks a streaming job yields, in order, then one terminal entry (done,
        failed or cancelled) written by the script that finishes the job (stream_append.lua lists
        the entries). Capped at Settings.stream_max_len entries (XADD MAXLEN ~, oldest trimmed
        first), so a job that streams forever holds bounded memory; a reader further behind than
        that is told which chunks it missed. Expires with the job's record: the finish gives it
        the record's TTL (the result TTL), and every append renews it so a stream whose job never
        finishes does not stay."""
        return f"{self.prefix}stream:{job_id}"

    def idempotency(self, key: str) -> str:
        """STRING: idempotency key -> job id, so a retried submit returns the first job."""
        return f"{self.prefix}idem:{key}"

    @property
    def ingress(self) -> str:
        """ZSET: submitted jobs waiting for level 1, scored by submit sequence (FIFO)."""
        return f"{self.prefix}ingress"

    @property
    def ingress_signal(self) -> str:
        """LIST: a token per submit batch, so the router blocks instead of polling the ingress."""
        return f"{self.prefix}ingress:signal"

    @property
    def seq(self) -> str:
        """STRING counter: the submit sequence, the 'arrival' part of every queue order."""
        return f"{self.prefix}seq"

    @property
    def queues(self) -> str:
        """SET: names of every queue a job was ever enqueued into (for expiry sweeps and stats)."""
        return f"{self.prefix}queues"

    @property
    def delayed(self) -> str:
        """ZSET: delayed and retrying jobs scored by the ms time they become due."""
        return f"{self.prefix}delayed"

    def queue(self, name: str) -> str:
        """ZSET (all scores 0): queued job ids ordered by their lexicographic order member."""
        return f"{self.prefix}q:{name}"

    def queue_age(self, name: str) -> str:
        """ZSET: queued job ids scored by enqueue ms, for the oldest wait in O(1)."""
        return f"{self.prefix}qage:{name}"

    def queue_signal(self, name: str) -> str:
        """LIST (at most one token): pushed when a queue gets jobs, so idle workers block on it."""
        return f"{self.prefix}qsig:{name}"

    def leased(self, name: str) -> str:
        """ZSET: running job ids of a queue scored by lease deadline ms."""
        return f"{self.prefix}leased:{name}"

    def dead(self, name: str) -> str:
        """ZSET: dead-lettered job ids of a queue scored by the ms time they died; kept (no TTL)."""
        return f"{self.prefix}dead:{name}"

    def finished(self, name: str) -> str:
        """LIST: ids of the jobs of a queue that finished succeeded or cancelled (the
        INGRESS_QUEUE's: cancelled before routing), newest at the head; at most
        FINISHED_INDEX_LEN (plus one trim's worth), the oldest popped once their record has
        expired. The only index of finished jobs, for listing them (a listing skips entries
        whose record expired since)."""
        return f"{self.prefix}done:{name}"

    def counts(self, name: str) -> str:
        """HASH: running totals of a queue (enqueued, completed, failed); rates are deltas."""
        return f"{self.prefix}counts:{name}"

    def leader(self, role: str) -> str:
        """STRING: the holder of a leader lock (router, controller) with a TTL renewed by it."""
        return f"{self.prefix}leader:{role}"

    def health(self, role: str, host: str) -> str:
        """STRING (JSON): one role host's health record (progress, failures, restarts), rewritten
        every few seconds with a TTL, so a host that died or whose event loop is blocked ages out
        and shows as gone (scheduler.service.health)."""
        return f"{self.prefix}health:{role}:{host}"

    @property
    def health_index(self) -> str:
        """SET: the keys of the health records published so far; a reader drops members whose
        record has expired."""
        return f"{self.prefix}health"

    def moved_aside(self, key: str, now_ms: int) -> str:
        """Where the scripts rename `key` when it holds the wrong Redis type (a string where a
        queue's sorted set belongs, a list where a job's hash does): `corrupt:<ms>:<key after the
        prefix>`, with '~1', '~2', ... appended if that name is taken (_common.lua move_aside).
        Renamed, not deleted: what is there was written by someone else, by hand or by another
        program, and may be worth reading; the data the store lost with it is only visible there.
        The name keeps the namespace's hash tag, so the rename stays in one Cluster slot. It
        expires with the dead-letter retention (of a job record) or the script's TTL."""
        return f"{self.prefix}corrupt:{now_ms}:{key.removeprefix(self.prefix)}"

    @property
    def corrupt_totals(self) -> str:
        """HASH: counts since the namespace was created of job records readers found corrupt
        and dead-lettered ('records') and keys of the wrong type they moved aside ('keys'); in
        StoreStats, so an operator sees that something writes garbage even when serving goes on."""
        return f"{self.prefix}corrupt:totals"

    @property
    def allocation(self) -> str:
        """STRING (JSON): the controller's latest per-queue state (workers, rates, service times),
        rewritten every tick; `status` and load-aware routing read it. Expires (ALLOCATION_TTL_S) so
        a stopped service does not look alive."""
        return f"{self.prefix}allocation"

    @property
    def allocation_history(self) -> str:
        """LIST (JSON entries, newest last): allocation changes {t, workers}, trimmed to
        ALLOCATION_HISTORY_LEN entries, for `status` and the demo's plot."""
        return f"{self.prefix}allocation:history"

    @property
    def acting_policy(self) -> str:
        """STRING (JSON {role, by, t_s}): which of the configured allocation policy ('configured')
        and its shadow ('shadow') acts, written by `bilevel promote` or an automatic promotion and
        read by the controller every tick. No TTL: a promotion outlives controller restarts until
        promoted back; the config file is never rewritten."""
        return f"{self.prefix}allocation:acting"
