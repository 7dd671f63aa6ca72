"""Which deployment a client-side command (status, submit) talks to: --config, or --redis-url and
--namespace, or BILEVEL_REDIS_URL / BILEVEL_NAMESPACE."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from scheduler.commands._common import fail
from scheduler.commands.serve import load_config
from scheduler.config import ServiceConfig
from scheduler.errors import BilevelError
from scheduler.settings import Settings


def _first_error(exc: Exception) -> str:
    """A settings error as one line, without pydantic's quote of the input (a URL's password)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(p) for p in first['loc']) or 'settings'}: {first['msg']}"
    return str(exc)


def resolve_target(
    config_path: Path | None, redis_url: str | None, namespace: str | None
) -> tuple[Settings, ServiceConfig | None]:
    """Store settings (with a Redis URL) and the service config when one was given; Exit(2) when
    no Redis URL is known (an embedded server would be empty: there is nothing to talk to)."""
    config = load_config(config_path) if config_path is not None else None
    settings = config.store if config is not None else Settings()
    update: dict[str, object] = {}
    if redis_url is not None:
        update["redis_url"] = SecretStr(redis_url)
    if namespace is not None:
        update["namespace"] = namespace
    if update:
        # model_copy skips validation: check the namespace the way the config would.
        try:
            settings = Settings(**{**settings.model_dump(), **update})
        except (ValueError, BilevelError) as exc:
            raise fail(_first_error(exc)) from None
    if settings.url() is None:
        raise fail(
            "no Redis URL: pass --redis-url, set BILEVEL_REDIS_URL, or give a --config with "
            "store.redis_url (serve prints its embedded server's URL)"
        )
    return settings, config
