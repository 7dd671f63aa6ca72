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
# Model loads kept in the recording's load stream (`Keys.record_loads`): one entry per queue a
# worker is assigned, so this covers thousands of moves at about 100 bytes each.
RECORD_LOADS_LEN = 2_000
# Events kept in a job record's `history` field (failed attempts, expired leases, replays): a job
# that fails a hundred times keeps a record of bounded size (mirrored in _common.lua).
HISTORY_LEN = 20
# Upper bounds (ms) of the histogram buckets of job completion time, queue wait and model-load time
# kept per queue in Keys.timing (a last bucket, +Inf, takes the rest): from a fast inference job
# to a five-minute model load, about two buckets a decade (mirrored in _common.lua).
TIMING_BUCKETS_MS: tuple[int, ...] = (
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
)  # fmt: skip
# Level-2 decisions kept (Keys.decisions), newest first: the last minute or so of a controller
# that changes its mind every tick, what `bilevel status --decisions` and the dashboard show.
DECISIONS_LEN = 50


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
        """HASH: running totals of a queue: jobs enqueued, completed, failed attempts, retried
        (failed attempts scheduled again), dead (dead-lettered) and rejected (refused at admission);
        rates are deltas."""
        return f"{self.prefix}counts:{name}"

    def timing(self, name: str) -> str:
        """HASH: what a queue's finished jobs took, as histogram buckets (counts per bucket of
        TIMING_BUCKETS_MS, not cumulative) and sums in ms: job completion time, submit to success
        ('j1'.. 'jN', 'js'); queue wait, submit to first lease ('w1'.., 'ws'); model loads of
        workers moving to the queue ('l1'.., 'ls'). SLO outcomes of its succeeded jobs: 'sn' judged
        (a deadline or the queue's SLO), 'sm' met; 'slo_ms' the queue's SLO as the controller last
        wrote it. Written by complete.lua (one HINCRBY per field per call) and the workers, so any
        process can export the histograms."""
        return f"{self.prefix}timing:{name}"

    @property
    def tenant_usage(self) -> str:
        """HASH: usage per tenant of the jobs that name one: 'c:<tenant>' jobs succeeded,
        's:<tenant>' ms from their first lease to success (complete.lua)."""
        return f"{self.prefix}tenant_usage"

    @property
    def decisions(self) -> str:
        """LIST (JSON, newest first): the last DECISIONS_LEN level-2 decisions that changed the
        allocation or that a guardrail or the fallback shaped, each with what the policy saw
        (scheduler.service.decisions)."""
        return f"{self.prefix}decisions"

    @property
    def decision_totals(self) -> str:
        """HASH: level-2 counts since the namespace was created: 'ticks', 'changes', 'fallbacks',
        and 'guardrail:<name>' per guardrail that changed a proposal."""
        return f"{self.prefix}decisions:totals"

    def tenants(self, name: str) -> str:
        """HASH: jobs waiting in a queue (or the INGRESS_QUEUE) per tenant ('' for none), kept by
        the scripts as members come and go, so per-tenant demand costs no scan; fields at 0 are
        deleted, so the hash holds the tenants with work waiting there."""
        return f"{self.prefix}tenants:{name}"

    @property
    def tenants_all(self) -> str:
        """HASH: the same over the ingress and every queue: what a tenant's max_queued counts."""
        return f"{self.prefix}tenants:~all"

    @property
    def inflight(self) -> str:
        """HASH: leased jobs per tenant with a quota (max_in_flight), for lease.lua to hold back
        the jobs of a tenant at its quota. A leased job so counted carries 'qt' in its record."""
        return f"{self.prefix}inflight"

    @property
    def admission(self) -> str:
        """HASH: the admission caps and tenant shares the service published
        (scheduler.admission), read by submit, enqueue and lease; no TTL: the config holds
        until a service publishes another."""
        return f"{self.prefix}admission"

    @property
    def drain(self) -> str:
        """HASH: each queue's recent drain rate (jobs/s), rewritten every controller tick with a
        short TTL (admission.DRAIN_TTL_S) so a stopped controller's rates do not linger."""
        return f"{self.prefix}drain"

    def fair(self, name: str) -> str:
        """HASH: a queue's fair-share state: '~v' its virtual time and, per tenant with jobs
        tagged ahead of it, that tenant's last virtual finish tag (policies.fairshare)."""
        return f"{self.prefix}fair:{name}"

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
    def record(self) -> str:
        """STREAM: one entry per job finished while Settings.record is on (its id, arrival,
        first start and finish ms, queue, routing view, attempts, status, the run ms its worker
        measured and the tokens its handler reported), appended by the script that finishes it
        Capped at about Settings.record_max_len
        entries (XADD MAXLEN ~), oldest first; no TTL: the cap bounds it. Read by
        `bilevel record` (scheduler/recording.py); `record` in _common.lua lays out an entry."""
        return f"{self.prefix}record"

    @property
    def record_loads(self) -> str:
        """STREAM: one entry per model load a worker made (queue, job types, seconds each),
        appended by the worker after it loads (while Settings.record is on); capped at about
        RECORD_LOADS_LEN entries. `bilevel record` takes each queue's model-load time from it."""
        return f"{self.prefix}record:loads"

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
