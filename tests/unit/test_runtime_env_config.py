"""The service config's `handlers:` entries and `runtime_env`: shapes, errors naming the field, and
paths relative to the config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.config import DEFAULT_EXCLUDES, ConfigError, RuntimeEnvConfig, ServiceConfig

QUEUES = [{"name": "q", "job_types": ["embed"]}]
ALLOCATION = {"budget": 2}


def config(**raw: Any) -> ServiceConfig:
    return ServiceConfig.from_mapping(
        {"queues": QUEUES, "allocation": ALLOCATION, **raw}, base_dir=Path("/srv/app")
    )


def error_of(**raw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        config(**raw)
    return str(info.value)


class TestHandlerEntries:
    def test_module_names_and_files_are_told_apart(self) -> None:
        """A dotted name stays a name; a .py entry is a file made absolute against the config's
        directory."""
        c = config(handlers=["workers.demo_models", "my_handlers", "./lib/my_extra.py", "/x/y.py"])
        assert c.handlers == (
            "workers.demo_models",
            "my_handlers",
            "/srv/app/lib/my_extra.py",
            "/x/y.py",
        )

    def test_an_entry_that_is_neither_is_named_by_index(self) -> None:
        """Neither a module name nor a .py file: the error names handlers.N and both forms."""
        message = error_of(handlers=["workers.demo_models", "my-handlers"])
        assert "handlers.1" in message
        assert "neither a module name" in message
        assert "./my_handlers.py" in message

    def test_a_file_whose_name_cannot_be_imported_is_refused(self) -> None:
        """my-handlers.py cannot be imported as a module: the error suggests a name that can."""
        message = error_of(handlers=["./my-handlers.py"])
        assert "handlers.0" in message
        assert "my_handlers.py" in message

    def test_load_resolves_against_the_config_file_not_the_cwd(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """ServiceConfig.load makes relative paths absolute against the file's own directory."""
        app = tmp_path / "app"
        app.mkdir()
        (app / "service.yaml").write_text(
            yaml.safe_dump(
                {
                    "queues": QUEUES,
                    "allocation": ALLOCATION,
                    "handlers": ["./my_handlers.py"],
                    "runtime_env": {"working_dir": ".", "py_modules": ["../lib"], "pip": "req.txt"},
                }
            )
        )
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        c = ServiceConfig.load("../app/service.yaml")
        assert c.handlers == (str(app / "my_handlers.py"),)
        assert c.runtime_env.working_dir == str(app)
        assert c.runtime_env.py_modules == (str(tmp_path / "lib"),)
        assert c.runtime_env.pip == str(app / "req.txt")


class TestRuntimeEnvShape:
    def test_default_is_empty_and_gives_ray_nothing(self) -> None:
        """No runtime_env: nothing for Ray to install."""
        env = config().runtime_env
        assert env.empty
        assert env.to_ray() == {}

    def test_uris_are_left_alone(self) -> None:
        """Remote locations are not paths: no resolving."""
        env = config(
            runtime_env={"working_dir": "s3://bucket/code.zip", "py_modules": ["gs://b/m.whl"]}
        ).runtime_env
        assert env.working_dir == "s3://bucket/code.zip"
        assert env.py_modules == ("gs://b/m.whl",)

    def test_to_ray_adds_the_default_excludes_and_the_setup_timeout(self) -> None:
        """Code to upload gets bilevel's excludes before the user's; every env gets the timeout."""
        env = config(
            runtime_env={"working_dir": ".", "excludes": ["data/"], "setup_timeout_s": 90}
        ).runtime_env
        ray_env = env.to_ray()
        assert ray_env["working_dir"] == "/srv/app"
        assert ray_env["excludes"] == [*DEFAULT_EXCLUDES, "data/"]
        assert {".git", ".venv", ".cache", "__pycache__"} <= set(ray_env["excludes"])
        assert ray_env["config"] == {"setup_timeout_seconds": 90}
        only_vars = RuntimeEnvConfig(env_vars={"A": "1"}).to_ray()
        assert only_vars == {"env_vars": {"A": "1"}, "config": {"setup_timeout_seconds": 600}}

    def test_env_var_numbers_become_text_and_booleans_are_refused(self) -> None:
        """YAML's `OMP_NUM_THREADS: 1` is the text "1"; `FLAG: true` is ambiguous and refused,
        naming the variable; so is a name that is not one."""
        env = config(runtime_env={"env_vars": {"OMP_NUM_THREADS": 1, "RATIO": 0.5}}).runtime_env
        assert env.env_vars == {"OMP_NUM_THREADS": "1", "RATIO": "0.5"}
        assert "runtime_env.env_vars.FLAG" in error_of(runtime_env={"env_vars": {"FLAG": True}})
        assert "'A=B' is not an environment variable name" in error_of(
            runtime_env={"env_vars": {"A=B": "x"}}
        )

    def test_a_bad_requirement_is_named_with_its_entry(self) -> None:
        """A malformed PEP 508 specifier fails at load, naming runtime_env.pip and the entry."""
        message = error_of(runtime_env={"pip": ["numpy>=1.26", "torch>=>2"]})
        assert "runtime_env.pip" in message
        assert "entry 1: 'torch>=>2' is not a valid requirement" in message
        assert len(message.splitlines()) == 2  # the file's line, then one line for the field

    def test_pip_options_paths_and_urls_go_to_pip_as_they_are(self) -> None:
        """pip judges what is not a plain specifier (options, local paths, VCS URLs)."""
        pip = ("--index-url https://pypi.example/simple", "git+https://host/repo.git", "./pkg")
        assert config(runtime_env={"pip": list(pip)}).runtime_env.pip == pip

    @pytest.mark.parametrize(
        ("raw", "field"),
        [
            ({"workdir": "."}, "runtime_env.workdir"),
            ({"working_dir": ""}, "runtime_env.working_dir"),
            ({"py_modules": [""]}, "runtime_env.py_modules.0"),
            ({"excludes": [""]}, "runtime_env.excludes.0"),
            ({"setup_timeout_s": 0}, "runtime_env.setup_timeout_s"),
        ],
    )
    def test_bad_fields_are_named(self, raw: dict[str, Any], field: str) -> None:
        """Unknown keys, empty paths and a non-positive timeout name their field."""
        assert field in error_of(runtime_env=raw)
