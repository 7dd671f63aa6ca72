"""`bilevel promote`: make the shadow allocation policy the acting one, live.

It writes the role that should act (scheduler.service.shadow, Keys.acting_policy); the controller
applies it at its next tick, and the former acting policy becomes the shadow, so a second promote
switches back. The config file is not rewritten: the promotion lives in Redis, under the
deployment's namespace, and outlives controller restarts.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated

import typer

from scheduler.client import AsyncClient
from scheduler.commands._common import fail
from scheduler.commands._target import resolve_target
from scheduler.errors import BilevelError
from scheduler.service.shadow import ROLES, Role, RoleRecord, other_role
from scheduler.service.views import PublishedState
from scheduler.settings import Settings


async def _promote(settings: Settings) -> tuple[PublishedState, RoleRecord]:
    async with AsyncClient(settings=settings) as client:
        store = client.store
        raw = await store.redis.get(store.keys.allocation)
        if raw is None:
            raise fail(
                f"namespace {settings.namespace}: no controller has published its state "
                "recently (is the service running?)",
                code=1,
            )
        try:
            published = PublishedState.from_json(str(raw))
        except ValueError as exc:
            raise fail(f"namespace {settings.namespace}: {exc}", code=1) from None
        shadow = published.shadow
        if shadow is None:
            raise fail(
                f"namespace {settings.namespace}: the controller runs no shadow policy; set "
                "allocation.shadow in the service config to run one",
                code=1,
            )
        if shadow.acting_role not in ROLES:
            raise fail(f"published state names an unknown role {shadow.acting_role!r}", code=1)
        acting: Role = "shadow" if shadow.acting_role == "shadow" else "configured"
        role = other_role(acting)
        # Idempotent until the controller applies it: a repeat writes the same role again.
        record = RoleRecord(role, "manual", time.time())
        await store.redis.set(store.keys.acting_policy, record.to_json())
        return published, record


def promote(
    config_path: Annotated[
        Path | None, typer.Option("--config", help="Service config YAML (Redis and namespace).")
    ] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="Redis URL.")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Namespace.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Make the shadow allocation policy act (the acting one becomes the shadow).

    The controller switches at its next tick; run it again to switch back. The config file is
    not rewritten: the choice is kept in Redis and survives controller restarts.
    """
    settings, _ = resolve_target(config_path, redis_url, namespace)
    try:
        published, record = asyncio.run(_promote(settings))
    except BilevelError as exc:
        raise fail(str(exc), code=1) from None
    assert published.shadow is not None
    acting, shadow = published.policy, published.shadow.policy
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "namespace": settings.namespace,
                    "acting": shadow,
                    "shadow": acting,
                    "role": record.role,
                    "estimate": published.shadow.estimate,
                }
            )
        )
        return
    typer.echo(
        f"promoted {shadow} to acting ({acting} becomes the shadow) in namespace "
        f"{settings.namespace}; the controller switches at its next tick. The config file is "
        "unchanged: run `bilevel promote` again to switch back."
    )


def register(app: typer.Typer) -> None:
    """Adds the `promote` command to the CLI."""
    app.command("promote")(promote)
