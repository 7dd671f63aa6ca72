"""Connecting to a configured Redis: clear errors that name host and port, never the password."""

from __future__ import annotations

import asyncio
import socket

import pytest
import redis

from scheduler.client import Client
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.errors import RedisUnavailable
from scheduler.settings import Settings
from tests.conftest import Runner

SECRET = "s3cr3t-Pa55"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def protected_server() -> EmbeddedRedis:
    server = EmbeddedRedis().start()
    admin = redis.Redis.from_url(server.url)
    admin.execute_command("ACL", "SETUSER", "app", "on", f">{SECRET}", "~*", "+@all")
    admin.config_set("requirepass", SECRET)
    admin.close()
    yield server  # type: ignore[misc]
    server.stop()


class TestConnectionErrors:
    def test_nothing_listening(self) -> None:
        """A refused connection names host and port."""
        port = _closed_port()
        with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{port}: connection failed"):
            Client(f"redis://:{SECRET}@127.0.0.1:{port}/0").connect()

    def test_wrong_password_never_echoes_it(self, protected_server: EmbeddedRedis) -> None:
        """Bad credentials say so, with host and port, and the password appears nowhere."""
        url = f"redis://app:wrong-{SECRET}@127.0.0.1:{protected_server.port}/0"
        with pytest.raises(RedisUnavailable) as info:
            Client(url).connect()
        text = str(info.value)
        assert f"127.0.0.1:{protected_server.port}" in text
        assert "authentication failed" in text
        assert SECRET not in text
        assert "wrong" not in text

    def test_missing_password(self, protected_server: EmbeddedRedis) -> None:
        """No credentials for a protected server is reported as such."""
        with pytest.raises(RedisUnavailable, match="authentication"):
            Client(f"redis://127.0.0.1:{protected_server.port}/0").connect()

    def test_user_and_password_work(self, protected_server: EmbeddedRedis) -> None:
        """redis://user:password@host:port connects with an ACL user."""
        url = f"redis://app:{SECRET}@127.0.0.1:{protected_server.port}/0"
        with Client(url, require_service=False) as client:
            assert client.submit("embed", 1).created

    @pytest.mark.parametrize(
        ("url", "message"),
        [
            (f"http://u:{SECRET}@host:1/0", "scheme 'http'"),
            (f"redis://u:{SECRET}@:6379/0", "no host"),
            (f"redis://u:{SECRET}@host:notaport/0", "invalid Redis URL"),
            # A password with an unescaped '/' ends the host part early: its tail reads as a port.
            (f"redis://u:{SECRET}/x@host:1/0", "port is not a number"),
        ],
    )
    def test_malformed_urls(self, url: str, message: str) -> None:
        """Malformed URLs are refused before any connection, without echoing secrets."""
        with pytest.raises(RedisUnavailable, match=message) as info:
            Client(url).connect()
        assert SECRET not in str(info.value)

    def test_settings_repr_hides_the_url(self) -> None:
        """The URL is a secret in settings: reprs and dumps do not show it."""
        settings = Settings.from_url(f"redis://u:{SECRET}@h:1/0")
        assert SECRET not in repr(settings)
        assert SECRET not in str(settings.model_dump())

    def test_url_from_environment(
        self, monkeypatch: pytest.MonkeyPatch, redis_server: EmbeddedRedis
    ) -> None:
        """BILEVEL_REDIS_URL selects the server when no URL is passed."""
        monkeypatch.setenv("BILEVEL_REDIS_URL", redis_server.url)
        monkeypatch.setenv("BILEVEL_NAMESPACE", "from-env")
        monkeypatch.setenv("BILEVEL_REQUIRE_SERVICE", "false")
        with Client() as client:
            assert client.async_client.embedded is None
            assert client.settings.namespace == "from-env"
            client.handle(client.submit("embed").id).cancel()


class TestCancellation:
    def test_cancelling_a_task_between_commands_always_ends_it(
        self, redis_server: EmbeddedRedis, run: Runner
    ) -> None:
        """A task issuing commands back to back ends when cancelled, whenever the cancel lands.
        (redis-py bounds each write with asyncio.wait_for, which on Python 3.11 lost about half
        of such cancellations; the project's connections bound it with asyncio.timeout.)"""

        async def body() -> int:
            client = client_from_url(redis_server.url)
            lost = 0
            try:
                for i in range(60):

                    async def commands() -> None:
                        while True:
                            await client.ping()

                    task = asyncio.create_task(commands())
                    await asyncio.sleep(0.001 * (i % 4))
                    task.cancel()
                    done, _ = await asyncio.wait({task}, timeout=2.0)
                    if not done:
                        lost += 1
                        while not task.done():  # a lost cancellation: stop it for good
                            task.cancel()
                            await asyncio.wait({task}, timeout=0.1)
            finally:
                await client.aclose()
            return lost

        assert run(body()) == 0
