"""Checkpoint files of learned policies, and the one resolver from a policy name or path to a policy.

A checkpoint is two files side by side: `NAME.pt`, the networks' weights (a torch state dict of
tensors only, loaded with `weights_only=True`, so opening a checkpoint can never run code), and
`NAME.json`, its metadata: the feature-schema version the networks were trained on, their
hyper-parameters, the scenarios and seeds, evaluation metrics and training time. A checkpoint whose
feature schema differs from `policies.features.FEATURE_SCHEMA_VERSION` is refused: its networks
would be fed features whose meaning changed under them.

`resolve_allocator` is what `bilevel simulate`, `bilevel evaluate` and the live controller call:
a registry name gives that heuristic, "learned" the shipped default checkpoint, anything else is a
checkpoint path.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from policies.features import FEATURE_SCHEMA_VERSION
from policies.learned.policy import LearnedPolicy
from policies.registry import ALLOCATORS, ROUTERS, make_allocator, make_router
from policies.views import AllocationBounds, Allocator, Router
from scheduler.stopping import STOP_SIGNALS

# Identifies our metadata files, and the version of their layout (not of the features).
CHECKPOINT_FORMAT = "bilevel-learned-policy"
CHECKPOINT_FORMAT_VERSION = 1
# The name that means "the checkpoint shipped in the package".
LEARNED = "learned"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, corrupt or incompatible; the message says which
    file and why."""


def default_checkpoint_path() -> Path:
    """The shipped default checkpoint's weights file (policies/checkpoints/default.pt)."""
    return Path(str(resources.files("policies") / "checkpoints" / "default.pt"))


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights .pt, metadata .json) for a checkpoint given by either file or by the bare stem."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".pt", ".json") else p
    return stem.with_name(stem.name + ".pt"), stem.with_name(stem.name + ".json")


def _first_line(exc: BaseException) -> str:
    """An error's first line (its first sentence when that line is long): torch's own messages
    run to a page of advice about options that must not be used here."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    return first.split(". ", 1)[0] if len(first) > 120 else first


def _json_safe(value: Any) -> Any:
    """NaN and infinity become None: the metadata must be strict JSON for other tools."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def save_checkpoint(
    path: str | Path, policy: LearnedPolicy, metadata: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Writes `policy` and `metadata` (plus format, schema version and hyper-parameters, which
    always come from here) as a checkpoint; returns the two paths written."""
    weights_path, meta_path = checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata or {})
    meta.update(
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "feature_schema_version": FEATURE_SCHEMA_VERSION,
            "hyperparameters": policy.hyperparameters(),
            "weights_file": weights_path.name,
        }
    )
    text = json.dumps(_json_safe(meta), indent=2, sort_keys=True, allow_nan=False) + "\n"
    # Both files go to temporary names first and replace the old pair together, with SIGINT and
    # SIGTERM held meanwhile: an interrupted or failed write leaves the old pair or the new one,
    # never half a file, nor new weights beside the old metadata.
    token = secrets.token_hex(4)
    temps = [p.with_name(f".{p.name}.{token}.tmp") for p in (weights_path, meta_path)]
    try:
        # Created like any new file (mode from the umask), exclusively: no other writer's temp.
        with temps[0].open("xb") as f:
            torch.save(policy.state_dict(), f)
        with temps[1].open("x", encoding="utf-8") as f:
            f.write(text)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            os.replace(temps[0], weights_path)
            os.replace(temps[1], meta_path)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    return weights_path, meta_path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata, checked for format and feature-schema version."""
    weights_path, meta_path = checkpoint_paths(path)
    if not meta_path.exists():
        raise CheckpointError(
            f"checkpoint metadata {meta_path} not found (a checkpoint is {weights_path.name} "
            f"plus {meta_path.name})"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint metadata {meta_path} is unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path} is not a bilevel checkpoint (no format marker)")
    version = meta.get("feature_schema_version")
    if version != FEATURE_SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint {weights_path} was trained on feature schema version {version}, but this "
            f"bilevel computes feature schema version {FEATURE_SCHEMA_VERSION}; retrain it with "
            "`bilevel train` (features changed meaning, so its networks would be fed wrong inputs)"
        )
    return meta


def load_checkpoint(path: str | Path) -> tuple[LearnedPolicy, dict[str, Any]]:
    """(policy, metadata) of a checkpoint; CheckpointError names the file and the problem."""
    weights_path, _ = checkpoint_paths(path)
    meta = read_metadata(path)
    if not weights_path.exists():
        raise CheckpointError(f"checkpoint weights {weights_path} not found")
    try:
        policy = LearnedPolicy.from_hyperparameters(meta["hyperparameters"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint metadata {checkpoint_paths(path)[1]} has bad hyperparameters: {exc!r}"
        ) from None
    try:
        state = torch.load(weights_path, weights_only=True)
        policy.load_state_dict(state)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint weights {weights_path} are corrupt or do not match its metadata: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None
    return policy, meta


def named_policy(name_or_path: str | Path, kind: str, known: Iterable[str]) -> LearnedPolicy:
    """The learned policy of "learned" (the shipped checkpoint) or of a checkpoint path, for a
    `kind` ("policy", "router") whose registry names are `known`. CheckpointError names the file
    and, when there is none, the names that would have worked."""
    name = str(name_or_path)
    path = default_checkpoint_path() if name == LEARNED else Path(name_or_path)
    if name != LEARNED and not checkpoint_paths(path)[0].exists():
        names = ", ".join(sorted([*known, LEARNED]))
        raise CheckpointError(
            f"no checkpoint at {checkpoint_paths(path)[0]} and {name!r} is not a {kind} name; "
            f"known {kind} names: {names}"
        )
    policy, _ = load_checkpoint(path)
    return policy


def resolve_allocator(name_or_path: str | Path, **params: Any) -> Allocator:
    """An allocator by registry name (built with `params`), "learned" (the shipped checkpoint) or a
    checkpoint path.

    A learned allocator accepts `bounds` (an AllocationBounds, which its move masks respect) and
    `max_moves`; it is returned bare, to be wrapped in `policies.guardrails.Guardrails` like any
    allocator. Raises ValueError for an unknown name and CheckpointError for a bad checkpoint.
    """
    if str(name_or_path) in ALLOCATORS:
        return make_allocator(str(name_or_path), **params)
    unknown = sorted(set(params) - {"bounds", "max_moves"})
    if unknown:
        raise ValueError(f"bad parameters for a learned allocator: {unknown}")
    bounds = params.get("bounds")
    if bounds is not None and not isinstance(bounds, AllocationBounds):
        raise ValueError(f"bounds must be an AllocationBounds, got {type(bounds).__name__}")
    policy = named_policy(name_or_path, "policy", ALLOCATORS)
    return policy.allocator(bounds=bounds, max_moves=params.get("max_moves"))


def resolve_router(name_or_path: str | Path, **params: Any) -> Router:
    """A router by registry name (built with `params`), "learned" (the shipped checkpoint's router)
    or a checkpoint path; errors as `resolve_allocator`."""
    if str(name_or_path) in ROUTERS:
        return make_router(str(name_or_path), **params)
    if params:
        raise ValueError(f"a learned router takes no parameters, got {sorted(params)}")
    return named_policy(name_or_path, "router", ROUTERS).router()
