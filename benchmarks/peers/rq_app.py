"""RQ's side of bench_e2e: the no-op job function RQ workers import by name."""

from __future__ import annotations


def noop(x: int) -> int:
    return x
