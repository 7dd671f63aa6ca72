"""A user's own handlers end to end: the example of docs/handlers.md served by `bilevel serve` from
its own directory (no PYTHONPATH to it, its own local Ray), serve's refusals, and the runtime_env
on a Ray that the caller started."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.client import Client, JobRequest
from scheduler.config import ServiceConfig
from scheduler.errors import JobFailed
from scheduler.settings import Settings
from tests.conftest import REPO_ROOT
from tests.integration.processes import Tracked

EXAMPLES = REPO_ROOT / "docs" / "examples"
EXAMPLE_FILES = ("my_handlers.py", "my_service.yaml", "lexicon.txt")
BILEVEL = Path(sys.prefix) / "bin" / "bilevel"


def example_copy(tmp_path: Path) -> Path:
    """The example's files, as committed, in a directory of their own."""
    directory = tmp_path / "my_service"
    directory.mkdir()
    for name in EXAMPLE_FILES:
        shutil.copy(EXAMPLES / name, directory / name)
    return directory


def serve_env(**extra: str) -> dict[str, str]:
    """The environment of a `bilevel serve` a user starts: no BILEVEL_* or RAY_* settings (so a
    local Ray of its own). PYTHONPATH is the checkout under test (a worktree's venv may have
    another checkout installed), never the example's directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILEVEL_", "RAY_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env | extra


def importable(module: str, *, cwd: Path, env: dict[str, str]) -> bool:
    """Whether `module` imports in a fresh interpreter with `env`, started in `cwd`."""
    check = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([sys.executable, "-c", check], cwd=cwd, env=env).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_example_serves_from_its_directory_without_pythonpath(tmp_path: Path) -> None:
    """docs/examples as committed: `bilevel serve --config my_service.yaml` in their directory
    ships it as working_dir; the workers import the shipped copy; both handlers answer through the
    client; SIGTERM stops it and nothing it started is left."""
    directory = example_copy(tmp_path)
    env = serve_env()
    assert not importable("my_handlers", cwd=tmp_path, env=env), "my_handlers is on the path"
    serve = Tracked(
        [str(BILEVEL), "serve", "--config", "my_service.yaml"],
        cwd=directory,
        env=env,
        log=tmp_path / "serve.log",
    )
    try:
        shipped = serve.wait_for(
            r"shipping (\S+) to every node as runtime_env.working_dir", timeout_s=60
        )
        assert shipped.group(1) == str(directory.resolve())
        url = serve.wait_for(r"BILEVEL_REDIS_URL=(\S+)", timeout_s=180).group(1)
        imported = serve.wait_for(
            r"handler module my_handlers: the workers import (\S+)", timeout_s=30
        )
        # The shipped copy, unpacked by Ray in its session directory, not the file in `directory`.
        assert re.search(r"/runtime_resources/working_dir_files/_ray_pkg_\w+/my_handlers\.py$",
                         imported.group(1)), imported.group(1)  # fmt: skip
        serve.wait_for(r"bilevel serving namespace mine", timeout_s=30)
        with Client(url, settings=Settings.from_url(url, namespace="mine")) as client:
            check_example_results(client)
    finally:
        code = serve.stop()
    assert code == 0, serve.output()[-4000:]
    assert "stopped" in serve.output()
    assert not serve.leftovers(), "processes of serve survived it"
    # serve's local Ray kept its files in a temp dir of its own (/tmp/blray...): the session's.
    ray_temp = Path(imported.group(1).split("/session_")[0])
    assert ray_temp.parent == Path("/tmp"), ray_temp
    assert ray_temp.name.startswith("blray"), ray_temp
    shutil.rmtree(ray_temp, ignore_errors=True)


def check_example_results(client: Client) -> None:
    """Both handlers of my_handlers.py, through the router and their queues."""
    texts = {
        "positive": "What a wonderful, fast service",
        "negative": "Slow, broken and awful",
        "neutral": "The meeting is on Tuesday",
    }
    handles = {label: client.submit("sentiment", {"text": t}) for label, t in texts.items()}
    for label, handle in handles.items():
        result = handle.result(timeout=60)
        assert result["label"] == label, (texts[label], result)
    sentences = [f"batch sentence number {i} is good" for i in range(40)]
    batch = client.submit_many(
        [JobRequest("embed_text", {"text": s}) for s in sentences]
        + [JobRequest("embed_text", {"text": sentences[0]})]
    )
    vectors = client.gather(batch, timeout=60)
    assert all(len(v) == 64 for v in vectors)
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, abs_tol=1e-4) for v in vectors)
    assert vectors[0] == vectors[-1]  # the same text, the same fixed weights
    assert len({tuple(v) for v in vectors[:-1]}) == len(sentences)
    with pytest.raises(JobFailed, match="PayloadError"):
        client.submit("sentiment", {"txt": "no text"}, max_retries=3).result(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_pip_spec_ray_cannot_install_stops_the_start_naming_the_field(tmp_path: Path) -> None:
    """Ray's pip install fails on the node: serve exits 2 with one line naming runtime_env.pip
    and pip's reason, having stopped what it started (Redis, the control plane, Ray): nothing is
    left running. (Ray clones the venv before pip runs, up to a minute; one attempt, not three.)"""
    directory = example_copy(tmp_path)
    config = yaml.safe_load((directory / "my_service.yaml").read_text())
    missing = "bilevel-missing-package @ file:///nonexistent/bilevel-missing-package"
    config["runtime_env"] = {"pip": [missing], "setup_timeout_s": 300}
    (directory / "my_service.yaml").write_text(yaml.safe_dump(config))
    serve = Tracked(
        [str(BILEVEL), "serve", "--config", "my_service.yaml"],
        cwd=directory,
        env=serve_env(RUNTIME_ENV_RETRY_TIMES="1"),
        log=tmp_path / "serve.log",
    )
    try:
        code = serve.wait(timeout_s=400)
    finally:
        serve.stop()
    out = serve.output()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2, out[-4000:]
    assert len(errors) == 1, out[-4000:]
    assert errors[0].startswith("error: runtime_env.pip: Ray could not set it up: ERROR: ")
    assert "/nonexistent/bilevel-missing-package" in errors[0]
    assert "bilevel serving" not in out
    assert not serve.leftovers(), "processes of serve survived it"


@pytest.fixture
def restore_import_state(tmp_path: Path) -> Iterator[None]:
    """sys.path entries and modules that serve's checks add in this process are removed again."""
    path = list(sys.path)
    yield
    # Only the test's own modules: re-importing Ray's (say) would break the process's Ray.
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").is_relative_to(tmp_path):
            del sys.modules[name]
    sys.path[:] = path


@pytest.mark.usefixtures("restore_import_state")
class TestServeRefuses:
    """`bilevel serve` stops before Ray starts on handler code it cannot serve, in one line."""

    def write_config(self, directory: Path, **raw: Any) -> Path:
        config = yaml.safe_load((EXAMPLES / "my_service.yaml").read_text())
        config.update(raw)
        path = directory / "my_service.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def test_a_module_nowhere_names_itself_and_the_directory_searched(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Neither on the path nor in the directory serve starts in."""
        self.write_config(tmp_path, handlers=["my_handlerz"])
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(app, ["serve", "--config", "my_service.yaml"])
        assert result.exit_code == 2
        out = " ".join(result.output.split())
        assert "handlers.0: handler module 'my_handlerz' not found" in out
        assert f"in {tmp_path} (the directory the service starts in)" in out
        assert "Traceback" not in result.output

    def test_a_module_that_fails_to_import_names_its_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The module is found (by file, relative to the config) but raises on import."""
        (tmp_path / "broken_own_handlers.py").write_text("import math\nmath.no_such_function()\n")
        self.write_config(tmp_path, handlers=["./broken_own_handlers.py"])
        monkeypatch.chdir("/")
        result = CliRunner().invoke(app, ["serve", "--config", str(tmp_path / "my_service.yaml")])
        assert result.exit_code == 2
        out = " ".join(result.output.split())
        assert f"'broken_own_handlers' ({tmp_path / 'broken_own_handlers.py'}) failed" in out
        assert "AttributeError" in out

    def test_a_working_dir_too_large_for_ray_fails_before_ray_starts(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A (sparse) file over Ray's upload limit beside the handlers: exit 2, one line naming
        runtime_env.working_dir and the file, and no Ray."""
        import ray

        from scheduler.service.handler_code import ray_package_limit_bytes

        directory = example_copy(tmp_path)
        with (directory / "checkpoint.bin").open("wb") as f:
            f.truncate(ray_package_limit_bytes() + 1)
        monkeypatch.chdir(directory)
        was_initialized = ray.is_initialized()
        result = CliRunner().invoke(app, ["serve", "--config", "my_service.yaml"])
        assert result.exit_code == 2
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1
        assert errors[0].startswith(f"error: runtime_env.working_dir: {directory.resolve()} ")
        assert "checkpoint.bin" in result.output
        assert ray.is_initialized() == was_initialized


# -- a Ray the caller started (the tests' local Ray) ------------------------------------------------


@pytest.fixture
def started(ray_local: None) -> Iterator[list[Any]]:
    """Services a test starts; stopped at the end, whatever happened."""
    handles: list[Any] = []
    yield handles
    for handle in handles:
        handle.stop(timeout_s=20.0)


def env_service(settings: Settings, **raw: Any) -> ServiceConfig:
    return ServiceConfig.from_mapping(
        {
            "store": {**settings.model_dump(), "redis_url": settings.url()},
            "handlers": ["tests.integration.env_handlers"],
            "queues": [{"name": "env", "job_types": ["worker_env"], "min_workers": 1}],
            "allocation": {"budget": 1, "tick_s": 0.3},
            **raw,
        }
    )


@pytest.mark.slow
def test_env_vars_reach_the_workers_when_the_caller_started_ray(
    started: list[Any], settings: Settings
) -> None:
    """Ray already runs: runtime_env without local paths goes on the control plane actor, and
    the model workers it creates inherit it."""
    from scheduler.service.runner import start_service

    token = uuid.uuid4().hex
    config = env_service(settings, runtime_env={"env_vars": {"BILEVEL_TEST_TOKEN": token}})
    handle = start_service(config, leader_ttl_s=1.0)
    started.append(handle)
    assert handle.handler_files == {}  # installed code: nothing of the service's own to report
    with Client(handle.redis_url, settings=settings) as client:
        result = client.submit("worker_env", {"name": "BILEVEL_TEST_TOKEN"}).result(timeout=120)
    assert result["value"] == token


def test_a_local_working_dir_is_refused_when_the_caller_started_ray(
    ray_local: None, settings: Settings, tmp_path: Path
) -> None:
    """Ray uploads a local directory only at ray.init: with Ray already running, the start stops
    naming runtime_env.working_dir, before anything is started."""
    from scheduler.service.handler_code import RuntimeEnvError
    from scheduler.service.runner import live_role_hosts, start_service

    config = env_service(settings, runtime_env={"working_dir": str(tmp_path)})
    with pytest.raises(RuntimeEnvError, match=r"^runtime_env\.working_dir: Ray was initialised"):
        start_service(config)
    assert live_role_hosts(settings) == []
