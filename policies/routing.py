"""Level 1: route each job of a batch to one task queue (or reject it).

Every router shares one notion of eligibility (`is_eligible`): a queue may take a job when it accepts
the job's type and the job carries all of the queue's required tags. Routers differ only in how they
choose among eligible queues; a job with no eligible queue gets the same `Rejection` from all of them.

Load-aware routers estimate each queue's expected wait (`expected_wait_s`) and, inside one batch,
charge every job they route to its queue's backlog, so that a burst routed in one call spreads over
queues the way it would if the jobs had arrived one by one. Queues whose waits tie are equally
likely to be picked, by the injected rng: two idle replicas of a model must share the jobs that
arrive one at a time, not send them all to the first (as Ray Serve's power-of-two router shuffles
its pair).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from policies.views import JobView, QueueView, Rejection, RouteDecision

# Stands in for "infinite" wait on a queue with no worker at all: large enough that any staffed
# queue wins, finite so that backlog still orders several unstaffed queues.
NO_WORKER_WAIT_S = 1.0e9

# Queues listed in a rejection reason; beyond this the message says how many more there are.
_MAX_QUEUES_IN_REASON = 8

TieBreak = Literal["first", "round_robin", "random"]


def is_eligible(job: JobView, queue: QueueView) -> bool:
    """Whether rule routing may send `job` to `queue`: type accepted and required tags carried."""
    return job.job_type in queue.job_types and queue.required_tags <= job.tags


def eligible_indices(job: JobView, queues: Sequence[QueueView]) -> list[int]:
    """Indices (in queue order) of the queues `job` may be routed to."""
    return [i for i, q in enumerate(queues) if is_eligible(job, q)]


class EligibilityIndex:
    """eligible_indices for many jobs over the same queues, from an index by job type and tag.

    A batch over many tagged queues (one per tenant or site, say) holds about as many job kinds as
    queues, and scanning every queue per kind made routing it quadratic. A queue is eligible only
    if it takes the job's type and each of its required tags is on the job, so it is among the
    queues of that type that require no tag, or that require one of the job's tags: those few
    candidates are checked, in queue order.
    """

    def __init__(self, queues: Sequence[QueueView]) -> None:
        self._queues = queues
        self._untagged: dict[str, list[int]] = {}
        self._by_tag: dict[tuple[str, str], list[int]] = {}
        for i, q in enumerate(queues):
            for job_type in q.job_types:
                if not q.required_tags:
                    self._untagged.setdefault(job_type, []).append(i)
                for tag in q.required_tags:
                    self._by_tag.setdefault((job_type, tag), []).append(i)

    def eligible(self, job: JobView) -> list[int]:
        """The indices eligible_indices(job, queues) gives, in the same order."""
        candidates = set(self._untagged.get(job.job_type, ()))
        for tag in job.tags:
            candidates.update(self._by_tag.get((job.job_type, tag), ()))
        return [i for i in sorted(candidates) if is_eligible(job, self._queues[i])]


def _describe_queue(queue: QueueView) -> str:
    types = ", ".join(sorted(queue.job_types)) or "none"
    if queue.required_tags:
        return f"{queue.name} (types: {types}; requires tags: {', '.join(sorted(queue.required_tags))})"
    return f"{queue.name} (types: {types})"


def rejection_for(job: JobView, queues: Sequence[QueueView]) -> Rejection:
    """The rejection every router returns for a job no queue may take, saying what queues accept."""
    tags = ", ".join(sorted(job.tags)) if job.tags else "none"
    head = f"no queue accepts job {job.job_id!r} of type {job.job_type!r} with tags [{tags}]"
    if not queues:
        return Rejection(reason=f"{head}; there are no queues")
    # Queues that accept the type but want more tags are the likeliest fix, so they come first.
    same_type = [q for q in queues if job.job_type in q.job_types]
    others = [q for q in queues if job.job_type not in q.job_types]
    listed = [_describe_queue(q) for q in (same_type + others)[:_MAX_QUEUES_IN_REASON]]
    more = len(queues) - len(listed)
    suffix = f"; and {more} more" if more > 0 else ""
    return Rejection(reason=f"{head}; queues accept: {'; '.join(listed)}{suffix}")


def expected_wait_s(queue: QueueView, extra_backlog_s: float = 0.0) -> float:
    """Seconds a job joining `queue` now would wait before its service starts (an estimate).

    Work ahead of it is the waiting backlog plus `extra_backlog_s` (jobs routed earlier in the same
    batch) plus the remainder of the jobs in service, taken as half a service time each (the mean
    residual of a uniformly advanced service). That work is shared by the ready workers. When none is
    ready but some are loading, the model load is paid first (the whole load: the view does not say
    how far along it is). A queue with no worker at all waits `NO_WORKER_WAIT_S` plus its backlog.
    """
    work_s = queue.backlog_s + extra_backlog_s + 0.5 * queue.workers_busy * queue.service_time_s
    if queue.workers_ready > 0:
        return work_s / queue.workers_ready
    if queue.workers_loading > 0:
        return queue.model_load_s + work_s / queue.workers_loading
    return NO_WORKER_WAIT_S + work_s


def _job_work_s(job: JobView, queue: QueueView) -> float:
    """Seconds of work `job` adds to `queue`: its own estimate, else the queue's mean service time."""
    return job.size_estimate_s if job.size_estimate_s > 0.0 else queue.service_time_s


class _BatchLoad:
    """Expected waits for one batch, charging each routed job to the backlog of its queue; ties
    between equal waits are broken with `rng`."""

    def __init__(self, queues: Sequence[QueueView], rng: np.random.Generator) -> None:
        self._queues = queues
        self._rng = rng
        self._extra_backlog_s = [0.0] * len(queues)
        # Bumped on every charge, so heap entries computed before it are known to be stale.
        self._version = [0] * len(queues)
        # Entries (wait, random tie-break key, queue index, version) per job kind.
        self._heaps: dict[tuple[str, frozenset[str]], list[tuple[float, float, int, int]]] = {}

    def wait_s(self, index: int) -> float:
        return expected_wait_s(self._queues[index], self._extra_backlog_s[index])

    def charge(self, job: JobView, index: int) -> None:
        self._extra_backlog_s[index] += _job_work_s(job, self._queues[index])
        self._version[index] += 1

    def least_wait(self, candidates: Sequence[int]) -> int:
        """The candidate with the least expected wait; ties go to the first in `candidates`
        (callers pass them in random order)."""
        return min(candidates, key=self.wait_s)

    def least_wait_for_kind(self, job: JobView, candidates: Sequence[int]) -> int:
        """The eligible queue of least expected wait for the job's kind, ties broken uniformly at
        random, with one heap per kind, so a batch of m jobs over n queues costs O((m + n) log n)
        rather than O(m * n). Charging only ever raises a wait, so a stale entry can only sit too
        high in its heap, never too low: it is refreshed when it reaches the top, and an
        up-to-date top is the true minimum. Each entry carries a uniform random key drawn when it
        is made (n draws for the heap, one per refresh: O(1) each, so the bound holds), which
        orders entries of equal wait: among tied queues the least key, and so each of them, is
        equally likely to be on top."""
        key = (job.job_type, job.tags)
        heap = self._heaps.get(key)
        if heap is None:
            tie_keys = self._rng.random(len(candidates)).tolist()
            heap = [
                (self.wait_s(i), tie, i, self._version[i])
                for i, tie in zip(candidates, tie_keys, strict=True)
            ]
            heapq.heapify(heap)
            self._heaps[key] = heap
        while True:
            _, _, index, version = heap[0]
            if version == self._version[index]:
                return index
            refreshed = (self.wait_s(index), self._rng.random(), index, self._version[index])
            heapq.heapreplace(heap, refreshed)


# Chooses one index out of a non-empty list of eligible queue indices, for one job.
_Choose = Callable[[JobView, list[int]], int]


def _route_each(
    jobs: Sequence[JobView],
    queues: Sequence[QueueView],
    choose: _Choose,
    load: _BatchLoad | None = None,
) -> list[RouteDecision]:
    """The loop all routers share: eligibility, the common rejection, then the router's choice.

    `choose` is only asked when there is a real choice (two or more eligible queues). With `load`,
    every routed job, forced or chosen, is charged to its queue's backlog for the rest of the batch.
    """
    decisions: list[RouteDecision] = []
    # Batches are mostly a few job kinds over many queues: check eligibility once per kind.
    eligible_by_kind: dict[tuple[str, frozenset[str]], list[int]] = {}
    lookup: EligibilityIndex | None = None
    for job in jobs:
        kind = (job.job_type, job.tags)
        eligible = eligible_by_kind.get(kind)
        if eligible is None:
            if lookup is None:
                lookup = EligibilityIndex(queues)
            eligible = eligible_by_kind[kind] = lookup.eligible(job)
        if not eligible:
            decisions.append(rejection_for(job, queues))
            continue
        index = eligible[0] if len(eligible) == 1 else choose(job, eligible)
        if load is not None:
            load.charge(job, index)
        decisions.append(queues[index].name)
    return decisions


class RuleRouter:
    """Routes by job type and tags; among several eligible queues `tie_break` decides.

    `"first"` takes the first eligible queue in queue order, `"round_robin"` rotates over the eligible
    queues per job type (state kept on the router), `"random"` draws uniformly with the given rng.
    """

    name: str = "rule"

    def __init__(self, tie_break: TieBreak = "first") -> None:
        if tie_break not in ("first", "round_robin", "random"):
            raise ValueError(
                f"unknown tie_break {tie_break!r}; expected 'first', 'round_robin' or 'random'"
            )
        self.tie_break: TieBreak = tie_break
        self._next_by_type: dict[str, int] = {}

    def route_batch(
        self,
        jobs: Sequence[JobView],
        queues: Sequence[QueueView],
        rng: np.random.Generator,
    ) -> list[RouteDecision]:
        """One decision per job, in order."""

        def choose(job: JobView, eligible: list[int]) -> int:
            if self.tie_break == "random":
                return eligible[int(rng.integers(len(eligible)))]
            if self.tie_break == "round_robin":
                turn = self._next_by_type.get(job.job_type, 0)
                self._next_by_type[job.job_type] = turn + 1
                return eligible[turn % len(eligible)]
            return eligible[0]

        return _route_each(jobs, queues, choose)


class ShortestExpectedWaitRouter:
    """Join-shortest-expected-wait among eligible queues, with in-batch backlog accounting; queues
    of equal wait are picked uniformly at random with the rng."""

    name: str = "shortest_wait"

    def route_batch(
        self,
        jobs: Sequence[JobView],
        queues: Sequence[QueueView],
        rng: np.random.Generator,
    ) -> list[RouteDecision]:
        """One decision per job, in order; each routed job adds to its queue's backlog."""
        load = _BatchLoad(queues, rng)

        def choose(job: JobView, eligible: list[int]) -> int:
            return load.least_wait_for_kind(job, eligible)

        return _route_each(jobs, queues, choose, load)


class PowerOfTwoRouter:
    """Samples two eligible queues with the rng and takes the one with less expected wait.

    Like Ray Serve's power-of-two-choices router: near-shortest-wait balance while looking at only
    two queues per job, which also keeps many routers from herding onto the same "best" queue. The
    pair comes in the random order it was drawn in, and a tie goes to its first, so each of two
    equal queues is picked half the time. Drawing two of n without replacement is O(1) (numpy's
    Floyd sampling), so a batch of m jobs costs O(m) wait estimates.
    """

    name: str = "power_of_two"

    def route_batch(
        self,
        jobs: Sequence[JobView],
        queues: Sequence[QueueView],
        rng: np.random.Generator,
    ) -> list[RouteDecision]:
        """One decision per job, in order; each routed job adds to its queue's backlog."""
        load = _BatchLoad(queues, rng)

        def choose(job: JobView, eligible: list[int]) -> int:
            picked = rng.choice(len(eligible), size=2, replace=False)
            return load.least_wait([eligible[int(k)] for k in picked])

        return _route_each(jobs, queues, choose, load)


class RandomRouter:
    """Uniform among eligible queues: the load-blind baseline."""

    name: str = "random"

    def route_batch(
        self,
        jobs: Sequence[JobView],
        queues: Sequence[QueueView],
        rng: np.random.Generator,
    ) -> list[RouteDecision]:
        """One decision per job, in order."""

        def choose(job: JobView, eligible: list[int]) -> int:
            return eligible[int(rng.integers(len(eligible)))]

        return _route_each(jobs, queues, choose)
