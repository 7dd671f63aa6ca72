"""`bilevel status` against a real Redis: its table fits 80 columns with long queue names, and
every number in it is whole."""

from __future__ import annotations

import json
import re
from typing import Any

from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.settings import Settings
from scheduler.store import Store
from tests.integration.helpers import new_job, submit_to_queue

WIDTH = 80
QUEUES = {
    "embeddings-for-the-multilingual-search-index-v2": 123,
    "generation-on-the-long-context-model": 7,
}


def test_status_table_fits_80_columns_with_long_queue_names(
    store: Store, settings: Settings, run: Any
) -> None:
    """Piped at 80 columns: no line wider, each queue's depth, in-flight and dead counts whole
    in its row, the oldest wait a whole number with its decimal, names shortened if at all."""
    for queue, depth in QUEUES.items():
        run(submit_to_queue(store, queue, *[new_job("embed") for _ in range(depth)]))
    args = ["status", "--redis-url", settings.url() or "", "--namespace", settings.namespace]
    env = {"COLUMNS": str(WIDTH)}
    shown = CliRunner().invoke(app, [*args, "--window", "0", "--json"], env=env)
    assert shown.exit_code == 0, shown.output
    rows = {q["queue"]: q for q in json.loads(shown.stdout)["queues"]}
    assert {q: rows[q]["depth"] for q in QUEUES} == QUEUES
    table = CliRunner().invoke(app, [*args, "--window", "0"], env=env)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= WIDTH, table.stdout
    for queue, depth in QUEUES.items():
        [line] = [
            line for line in lines if line.split() and queue.startswith(line.split()[0].rstrip("…"))
        ]
        _, cells = line.split(maxsplit=1)
        assert "…" not in cells
        depth_cell, wait_cell, in_flight, dead = cells.split()[:4]
        assert (int(depth_cell), int(in_flight), int(dead)) == (depth, 0, 0)
        assert re.fullmatch(r"-?\d+\.\d", wait_cell), line
