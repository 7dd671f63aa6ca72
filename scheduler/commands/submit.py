"""`bilevel submit JOB_TYPE PAYLOAD_JSON`: submit one job from the shell, optionally wait for it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from scheduler.client import AsyncClient
from scheduler.commands._common import fail
from scheduler.commands._target import resolve_target
from scheduler.errors import BilevelError, InvalidJob, JobCancelled, JobFailed, JobTimeout
from scheduler.settings import Settings


async def _submit(
    settings: Settings,
    job_type: str,
    payload: Any,
    options: dict[str, Any],
    wait: bool,
    timeout_s: float | None,
) -> dict[str, Any]:
    async with AsyncClient(settings=settings) as client:
        handle = await client.submit(job_type, payload, **options)
        out: dict[str, Any] = {"job_id": handle.id, "created": handle.created}
        if wait:
            out["result"] = await handle.result(timeout=timeout_s)
        return out


def submit(
    job_type: Annotated[str, typer.Argument(help="Job type, e.g. embed.")],
    payload_json: Annotated[str, typer.Argument(help='Payload as JSON, e.g. \'{"text": "hi"}\'.')],
    priority: Annotated[int, typer.Option("--priority", help="Higher runs first.")] = 0,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", metavar="TAG", help="A tag (repeatable).")
    ] = None,
    deadline_s: Annotated[
        float | None, typer.Option("--deadline", help="Seconds after submit to finish by.")
    ] = None,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    timeout_s: Annotated[
        float | None, typer.Option("--timeout", help="Seconds to wait with --wait.")
    ] = None,
    config_path: Annotated[
        Path | None, typer.Option("--config", help="Service config YAML.")
    ] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="Redis URL.")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Namespace.")] = None,
) -> None:
    """Submit a job; print {"job_id", "created"} (and "result" with --wait) as JSON.
    A failed job exits 1 with its error; an invalid job or option exits 2."""
    try:
        payload = json.loads(payload_json)
    except json.JSONDecodeError as exc:
        raise fail(f"PAYLOAD_JSON is not valid JSON: {exc}") from None
    settings, _ = resolve_target(config_path, redis_url, namespace)
    options: dict[str, Any] = {"priority": priority, "tags": tuple(tag or ())}
    if deadline_s is not None:
        options["deadline_s"] = deadline_s
    if idempotency_key is not None:
        options["idempotency_key"] = idempotency_key
    try:
        out = asyncio.run(_submit(settings, job_type, payload, options, wait, timeout_s))
    except InvalidJob as exc:
        raise fail(str(exc)) from None
    except JobFailed as exc:
        raise fail(f"job {exc.job_id} failed: {exc.error_type}: {exc.message}", code=1) from None
    except JobCancelled as exc:
        raise fail(f"job {exc.job_id} was cancelled", code=1) from None
    except JobTimeout as exc:
        raise fail(str(exc), code=1) from None
    except BilevelError as exc:
        raise fail(str(exc), code=1) from None
    typer.echo(json.dumps(out))


def register(app: typer.Typer) -> None:
    """Adds the `submit` command to the CLI."""
    app.command("submit")(submit)
