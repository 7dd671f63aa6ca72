"""CPU time of processes from /proc/<pid>/stat: the idle figure of a peer's worker processes.

Only Linux's /proc is read; a process that exits during a window drops out of the sum (an idle
worker pool does not fork, so none should).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """The fields of one /proc/<pid>/stat line that the bench uses."""

    pid: int
    comm: str
    ppid: int
    # utime + stime, in clock ticks (TICKS_PER_S a second).
    cpu_ticks: int
    # Ticks after boot at which the process started: with the pid, it names one process for good
    # (a pid alone may be reused once its process is gone).
    start_ticks: int


def parse_stat(line: str) -> ProcStat:
    """Parse one /proc/<pid>/stat line. The command name sits in parentheses and may itself hold
    spaces and parentheses, so the fields after it are found from the last ')'."""
    open_at, close_at = line.find("("), line.rfind(")")
    if open_at < 0 or close_at < open_at:
        raise ValueError(f"not a /proc/<pid>/stat line (no '(comm)'): {line[:80]!r}")
    # Fields after comm, numbered from 3 (state) as in proc(5): ppid is 4, utime 14, stime 15,
    # starttime 22.
    rest = line[close_at + 1 :].split()
    if len(rest) < 20:
        raise ValueError(f"/proc/<pid>/stat line has {len(rest) + 2} fields, expected >= 22")
    field = {n: rest[n - 3] for n in (4, 14, 15, 22)}
    return ProcStat(
        pid=int(line[:open_at]),
        comm=line[open_at + 1 : close_at],
        ppid=int(field[4]),
        cpu_ticks=int(field[14]) + int(field[15]),
        start_ticks=int(field[22]),
    )


def read_stat(pid: int) -> ProcStat | None:
    """The process's stat, or None when it is gone."""
    try:
        return parse_stat((PROC / str(pid) / "stat").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return None


def read_cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces ('' when gone or a kernel thread)."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def all_stats() -> list[ProcStat]:
    out = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := read_stat(int(entry.name))) is not None:
            out.append(stat)
    return out


def tree(roots: Iterable[int], stats: Iterable[ProcStat] | None = None) -> list[ProcStat]:
    """The roots and all their descendants that are alive, parents before children."""
    by_parent: dict[int, list[ProcStat]] = {}
    by_pid: dict[int, ProcStat] = {}
    for stat in all_stats() if stats is None else stats:
        by_parent.setdefault(stat.ppid, []).append(stat)
        by_pid[stat.pid] = stat
    out: list[ProcStat] = []
    frontier = [by_pid[pid] for pid in roots if pid in by_pid]
    while frontier:
        out += frontier
        frontier = [child for stat in frontier for child in by_parent.get(stat.pid, [])]
    return out


def matching(predicate: Callable[[int, str], bool]) -> list[ProcStat]:
    """Live processes for which predicate(pid, cmdline) holds."""
    return [stat for stat in all_stats() if predicate(stat.pid, read_cmdline(stat.pid))]


def still_same(stat: ProcStat) -> ProcStat | None:
    """The process now, if it is still the one `stat` was read from (same pid and start time)."""
    now = read_stat(stat.pid)
    return now if now is not None and now.start_ticks == stat.start_ticks else None


def cpu_core_fraction(
    before: Iterable[ProcStat], after: Iterable[ProcStat], window_s: float
) -> float:
    """Cores used over window_s by the processes in both snapshots: the sum of their CPU-time
    deltas (utime + stime) divided by the window. A process in only one snapshot is left out."""
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    start = {(s.pid, s.start_ticks): s.cpu_ticks for s in before}
    ticks = sum(
        s.cpu_ticks - start[(s.pid, s.start_ticks)]
        for s in after
        if (s.pid, s.start_ticks) in start
    )
    return ticks / TICKS_PER_S / window_s


def snapshot(processes: Iterable[ProcStat]) -> list[ProcStat]:
    """The given processes read again, those still alive and still the same process."""
    return [now for stat in processes if (now := still_same(stat)) is not None]


def idle_cpu(groups: Mapping[str, Iterable[ProcStat]], window_s: float) -> dict[str, float]:
    """Sleep window_s once and return the cores each group of processes used meanwhile."""
    before = {name: snapshot(procs) for name, procs in groups.items()}
    time.sleep(window_s)
    return {
        name: cpu_core_fraction(procs, snapshot(procs), window_s) for name, procs in before.items()
    }
