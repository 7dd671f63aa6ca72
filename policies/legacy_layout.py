"""Files in the layout used before `policies.schema`: translated with a note, or refused.

Before the one layout, a scenario wrote its budget as `cluster.workers`, its tick at the top level,
`allocator:` and `router:` as a name or `{name, params}`, and per-queue limits as maps in a
`guardrails:` section; a service accepted `allocation.hysteresis_workers: 0` (and ran it as 1) and
defaulted `allocation.budget` to 2. The loaders (`parse_scenario`, `ServiceConfig.load`) pass the
raw mapping through `upgrade_scenario` or `upgrade_service` first:

| old key (where)                                  | new key                                       |
|--------------------------------------------------|-----------------------------------------------|
| `cluster.workers` (scenario)                     | `allocation.budget`                           |
| `cluster.initial_allocation` (scenario)          | `allocation.initial`                          |
| `tick_s` (scenario)                              | `allocation.tick_s`                           |
| `allocator: NAME` or `{name, params}` (scenario) | `allocation.policy`, `allocation.params`      |
| no `allocator` (scenario)                        | `allocation.policy: proportional` (the old default; the layout's is switch_aware) |
| `router: NAME` or `{name, params}` (scenario)    | `routing.policy`, `routing.params`            |
| `guardrails.min_workers: {queue: n}`, `default_min` (scenario) | `min_workers: n` on each queue  |
| `guardrails.max_workers: {queue: n}`, `default_max` (scenario) | `max_workers: n` on each queue  |
| `guardrails.max_moves_per_tick`, `hysteresis_workers` (scenario) | the same keys under `allocation` |
| `allocation.hysteresis_workers: 0` (both)        | 1: the same behaviour (every change goes through) |
| no `allocation.budget` (service)                 | `allocation.budget: 2`, the old default      |

Every translation is lossless, so it is made rather than refused: each kept the file's meaning, and
refusing them would stop every existing scenario and deployment at once. The note says what the
file now reads as (the loaders raise it as a `LayoutDeprecationWarning`). A key is refused, with
what to write instead, only where the file's meaning is unclear: when the file also gives the new
form of the same key, or a per-queue map names a queue that does not exist, or an old section holds
a key that never existed. Errors in a translated value name the key the file wrote
(`Upgrade.renamed` maps the new path back to it).

Nothing here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from policies.schema import Problem

# The scenario keys the one layout replaced.
_OLD_SCENARIO_KEYS = ("cluster", "tick_s", "allocator", "router", "guardrails")
# What a service's allocation.budget defaulted to before it was required.
OLD_SERVICE_BUDGET = 2


class LayoutDeprecationWarning(FutureWarning):
    """A file in the old layout was translated; the message says what to write instead.

    A FutureWarning, so that Python shows it to the person running the command by default.
    """


@dataclass
class Upgrade:
    """A raw mapping in the one layout, and what it took to get there."""

    raw: dict[str, Any]
    # One line per translated key: "old is now new: value".
    notes: list[str] = field(default_factory=list)
    # Keys that cannot be translated, with what to write instead.
    refusals: list[Problem] = field(default_factory=list)
    # New field path -> the path the file wrote, so errors name what the user wrote.
    renamed: dict[str, str] = field(default_factory=dict)

    def message(self, source: str) -> str:
        """The deprecation warning for `source`: every translated key, one per line."""
        lines = "\n".join(f"  {note}" for note in self.notes)
        return (
            f"{source} is in the old layout and was translated; write the new keys (the README's "
            f"Configuration section shows the layout), the old ones will be refused in a later "
            f"release:\n{lines}"
        )

    def _section(self, name: str, old_path: str) -> dict[str, Any] | None:
        """The mutable copy of top-level section `name` (created if absent); None, with a
        refusal of `old_path`, when the file gives that section as something else."""
        section = self.raw.get(name)
        if section is None:
            section = {}
        elif not isinstance(section, Mapping):
            self.refusals.append((old_path, f"is now under {name}, which is not a mapping here"))
            return None
        copied = dict(section)
        self.raw[name] = copied
        return copied

    def move(self, old_path: str, new_path: str, value: Any) -> None:
        """`value`, written at `old_path`, to `new_path` (section.key), unless that is set too."""
        section_name, key = new_path.split(".", 1)
        section = self._section(section_name, old_path)
        if section is None:
            return
        if key in section:
            self.refusals.append(
                (old_path, f"is now {new_path}, which this file also sets: write only {new_path}")
            )
            return
        section[key] = value
        self.notes.append(f"{old_path} is now {new_path}: {_show(value)}")
        self.renamed[new_path] = old_path


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _policy(up: Upgrade, old: str, new: str, value: Any) -> None:
    """`allocator`/`router` (a name, or {name, params}) to `allocation`/`routing` policy and
    params."""
    if not isinstance(value, Mapping):
        up.move(old, f"{new}.policy", value)
        return
    for key, item in value.items():
        if key == "name":
            up.move(f"{old}.name", f"{new}.policy", item)
        elif key == "params":
            up.move(f"{old}.params", f"{new}.params", item)
        else:
            up.refusals.append(
                (f"{old}.{key}", f"unknown key ({old} was a name or {{name, params}}); write {new}")
            )


def _cluster(up: Upgrade, cluster: Any) -> None:
    if not isinstance(cluster, Mapping):
        up.refusals.append(("cluster", "is now allocation.budget: write allocation.budget"))
        return
    for key, value in cluster.items():
        if key == "workers":
            up.move("cluster.workers", "allocation.budget", value)
        elif key == "initial_allocation":
            up.move("cluster.initial_allocation", "allocation.initial", value)
        else:
            up.refusals.append(
                (
                    f"cluster.{key}",
                    "unknown key; cluster is now allocation: its workers are allocation.budget "
                    "and its initial_allocation allocation.initial",
                )
            )


def _queue_copies(up: Upgrade) -> list[dict[str, Any]] | None:
    """Mutable copies of the queues, for per-queue keys; None when the queues are not a list of
    mappings (pydantic then reports the queues themselves)."""
    queues = up.raw.get("queues")
    if not isinstance(queues, list | tuple) or not all(isinstance(q, Mapping) for q in queues):
        return None
    copies = [dict(q) for q in queues]
    up.raw["queues"] = copies
    return copies


def _set_on_queue(
    up: Upgrade, queues: list[dict[str, Any]], i: int, key: str, value: Any, old_path: str
) -> bool:
    """Sets queue i's `key` from `old_path`; False, with a refusal, when the queue sets it too."""
    if key in queues[i]:
        up.refusals.append(
            (
                old_path,
                f"is now queues.{i}.{key}, which this file also sets: write only queues.{i}.{key}",
            )
        )
        return False
    queues[i][key] = value
    up.renamed[f"queues.{i}.{key}"] = old_path
    return True


def _guardrails(up: Upgrade, guardrails: Any) -> None:
    where = (
        "per-queue min_workers and max_workers on each queue, max_moves_per_tick and "
        "hysteresis_workers under allocation"
    )
    if not isinstance(guardrails, Mapping):
        up.refusals.append(("guardrails", f"is now {where}"))
        return
    queues = _queue_copies(up)
    names = [q.get("name") for q in queues] if queues is not None else []
    from_maps: dict[str, set[int]] = {"min_workers": set(), "max_workers": set()}
    defaults: dict[str, Any] = {}
    for key, value in guardrails.items():
        if key in ("min_workers", "max_workers"):
            if queues is None:
                continue
            if not isinstance(value, Mapping):
                up.refusals.append(
                    (f"guardrails.{key}", f"is now {key} on each queue: write it there")
                )
                continue
            for name, count in value.items():
                old_path = f"guardrails.{key}.{name}"
                if name not in names:
                    up.refusals.append((old_path, f"unknown queue; queues are {names}"))
                    continue
                i = names.index(name)
                from_maps[key].add(i)
                if _set_on_queue(up, queues, i, key, count, old_path):
                    up.notes.append(f"{old_path} is now queues.{i}.{key}: {_show(count)}")
        elif key in ("default_min", "default_max"):
            defaults["min_workers" if key == "default_min" else "max_workers"] = value
        elif key in ("max_moves_per_tick", "hysteresis_workers"):
            up.move(f"guardrails.{key}", f"allocation.{key}", value)
        else:
            up.refusals.append((f"guardrails.{key}", f"unknown key; guardrails are now {where}"))
    if queues is None:
        return
    for key, value in defaults.items():
        old_path = f"guardrails.default_{key[:3]}"
        if value is None:  # default_max: null meant no maximum, which is the queues' default
            continue
        rest = [
            i
            for i in range(len(queues))
            if i not in from_maps[key] and _set_on_queue(up, queues, i, key, value, old_path)
        ]
        if not rest:
            continue
        up.notes.append(
            f"{old_path} is now {key} on each queue not in guardrails.{key}: {_show(value)} "
            f"(queues {', '.join(str(i) for i in rest)})"
        )


def _hysteresis_zero(up: Upgrade) -> None:
    """hysteresis_workers 0 held nothing, as 1 does; the one layout accepts 1 and up only."""
    allocation = up.raw.get("allocation")
    if not isinstance(allocation, Mapping):
        return
    value = allocation.get("hysteresis_workers")
    if type(value) is int and value == 0:
        copied = dict(allocation)
        copied["hysteresis_workers"] = 1
        up.raw["allocation"] = copied
        old = up.renamed.get("allocation.hysteresis_workers", "allocation.hysteresis_workers")
        up.notes.append(
            f"{old}: 0 let every change through, as 1 does, and is no longer accepted: read as 1"
        )


def upgrade_scenario(raw: Mapping[str, Any]) -> Upgrade:
    """A scenario mapping in the one layout (the input is not modified); see the module table."""
    up = Upgrade(dict(raw))
    old_file = "allocation" not in raw and any(key in raw for key in _OLD_SCENARIO_KEYS)
    if "cluster" in up.raw:
        _cluster(up, up.raw.pop("cluster"))
    if "tick_s" in up.raw:
        up.move("tick_s", "allocation.tick_s", up.raw.pop("tick_s"))
    if "allocator" in up.raw:
        _policy(up, "allocator", "allocation", up.raw.pop("allocator"))
    elif old_file:
        allocation = up._section("allocation", "allocator")
        if allocation is not None and "policy" not in allocation:
            allocation["policy"] = "proportional"
            up.notes.append(
                "allocator (not given) meant proportional; the default of allocation.policy is "
                'now switch_aware: "proportional"'
            )
    if "router" in up.raw:
        _policy(up, "router", "routing", up.raw.pop("router"))
    if "guardrails" in up.raw:
        _guardrails(up, up.raw.pop("guardrails"))
    _hysteresis_zero(up)
    return up


def upgrade_service(raw: Mapping[str, Any], *, budget_elsewhere: bool = False) -> Upgrade:
    """A service config mapping in the one layout (the input is not modified); see the module
    table. `budget_elsewhere`: the budget comes from the environment, so a file without one is
    not relying on the old default."""
    up = Upgrade(dict(raw))
    _hysteresis_zero(up)
    allocation = up.raw.get("allocation")
    if not budget_elsewhere and (
        allocation is None or (isinstance(allocation, Mapping) and "budget" not in allocation)
    ):
        up.raw["allocation"] = {**(allocation or {}), "budget": OLD_SERVICE_BUDGET}
        up.notes.append(
            f"allocation.budget (not given) defaulted to {OLD_SERVICE_BUDGET} workers and is now "
            f"required: {OLD_SERVICE_BUDGET}"
        )
    return up


__all__ = [
    "OLD_SERVICE_BUDGET",
    "LayoutDeprecationWarning",
    "Upgrade",
    "upgrade_scenario",
    "upgrade_service",
]
