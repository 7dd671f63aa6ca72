"""Print the chaos report as a table: `python -m tests.chaos.report [FILE]` (default
chaos-report.json, as written with BILEVEL_CHAOS_REPORT=chaos-report.json make test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = (
    ("scenario", "scenario"),
    ("jobs", "jobs"),
    ("lost", "lost"),
    ("failed", "failed"),
    ("ran_more_than_once", "ran twice+"),
)


def _recovery(entry: dict[str, Any]) -> str:
    parts = []
    for key, label in (
        ("takeover_s_max", "takeover ≤ {} s"),
        ("first_completion_after_kill_s", "first result after kill {} s"),
        ("routing_resumed_after_restart_s", "routing back {} s after restart"),
        ("routing_resumed_after_kill_s", "routing back {} s after kill"),
        ("promoted_after_kill_s", "promoted {} s after kill"),
        ("longest_submit_s", "longest submit {} s"),
        ("workers_killed", "{} workers killed"),
        ("victims", "{} corrupt records"),
    ):
        if key in entry:
            parts.append(label.format(entry[key]))
    return "; ".join(parts)


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else "chaos-report.json")
    entries: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    print("| " + " | ".join(label for _, label in COLUMNS) + " | recovery |")
    print("|" + "---|" * (len(COLUMNS) + 1))
    for e in entries:
        cells = [str(e.get(key, "")) for key, _ in COLUMNS]
        print("| " + " | ".join(cells) + f" | {_recovery(e)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
