"""Locating handler code and preparing its runtime_env (scheduler/service/handler_code.py), on
real directories with Ray's own validation and packing rules (no Ray cluster needed)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.config import ServiceConfig
from scheduler.service.handler_code import (
    HandlerCodeError,
    RuntimeEnvError,
    measure,
    prepare_handler_code,
    ray_package_limit_bytes,
)
from workers.registry import HandlerModuleError, HandlerRegistry

HANDLER = """
from workers.registry import REGISTRY

REGISTRY.register("{job_type}", loader=lambda: {value!r}, run=lambda model, payload: model)
"""


@pytest.fixture
def restore_import_state(tmp_path: Path) -> Iterator[None]:
    """Modules and sys.path entries a test adds are removed again (REGISTRY keeps registrations,
    so each test uses job types of its own)."""
    path = list(sys.path)
    yield
    # Only the test's own modules: re-importing Ray's (say) would break the process's Ray.
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").is_relative_to(tmp_path):
            del sys.modules[name]
    sys.path[:] = path


def write_handler(directory: Path, module: str, job_type: str, value: str = "v") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module}.py"
    path.write_text(HANDLER.format(job_type=job_type, value=value), encoding="utf-8")
    return path


def service(tmp_path: Path, handlers: list[str], **raw: Any) -> ServiceConfig:
    """A config file in tmp_path/app, loaded as serve loads it."""
    app = tmp_path / "app"
    app.mkdir(exist_ok=True)
    path = app / "service.yaml"
    job_types = [f"{m.rsplit('/', 1)[-1].removesuffix('.py')}_job" for m in handlers]
    queues = [{"name": f"q{i}", "job_types": [t]} for i, t in enumerate(job_types)]
    layout = {"queues": queues, "allocation": {"budget": 2}}
    path.write_text(yaml.safe_dump({**layout, "handlers": handlers, **raw}))
    return ServiceConfig.load(path)


class TestLocating:
    def test_a_module_found_only_in_the_cwd_is_shipped_as_working_dir(
        self, tmp_path: Path, restore_import_state: None
    ) -> None:
        """Not on the Python path, found in the directory serve starts in: that directory becomes
        runtime_env.working_dir (with the default excludes), and this process imports it."""
        project = tmp_path / "project"
        write_handler(project, "cwd_only_handlers", "cwd_only_handlers_job")
        code = prepare_handler_code(service(tmp_path, ["cwd_only_handlers"]), cwd=project)
        assert code.modules == ("cwd_only_handlers",)
        assert code.local_modules == ("cwd_only_handlers",)
        assert code.default_working_dir
        env = code.runtime_env
        assert env is not None
        assert env["working_dir"] == str(project.resolve())
        assert ".venv" in env["excludes"]
        assert code.summary() == [
            f"shipping {project.resolve()} to every node as runtime_env.working_dir (1 files, "
            f"{code.packages[0].size_bytes / 1024:.1f} KiB; the directory of handler module "
            "cwd_only_handlers, which is not installed)"
        ]
        registry = code.import_here(HandlerRegistry())
        assert registry is not None
        assert sys.modules["cwd_only_handlers"].__file__ == str(project / "cwd_only_handlers.py")

    def test_an_installed_module_ships_nothing(self, tmp_path: Path) -> None:
        """A module on the Python path is taken to be on every node: no runtime_env at all."""
        code = prepare_handler_code(ServiceConfig.from_mapping({"queues": [
            {"name": "e", "job_types": ["embed"]}], "allocation": {"budget": 1}}), cwd=tmp_path)  # fmt: skip
        assert code.modules == ("workers.demo_models",)
        assert code.local_modules == ()
        assert code.runtime_env is None
        assert code.summary() == []

    def test_a_file_entry_is_relative_to_the_config_and_imported_by_its_stem(
        self, tmp_path: Path, restore_import_state: None
    ) -> None:
        """`./lib/file_handlers.py` next to the config: module file_handlers, its directory
        shipped, wherever serve starts."""
        write_handler(tmp_path / "app" / "lib", "file_handlers", "file_handlers_job")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        code = prepare_handler_code(service(tmp_path, ["./lib/file_handlers.py"]), cwd=elsewhere)
        assert code.modules == ("file_handlers",)
        assert code.config.handlers == ("file_handlers",)
        env = code.runtime_env
        assert env is not None
        assert env["working_dir"] == str((tmp_path / "app" / "lib").resolve())
        code.import_here(HandlerRegistry())
        assert "file_handlers" in sys.modules

    def test_preparing_twice_gives_the_same_code(
        self, tmp_path: Path, restore_import_state: None
    ) -> None:
        """Once imported here (so now on the path), a prepared config prepares to itself."""
        write_handler(tmp_path / "app", "twice_handlers", "twice_handlers_job")
        code = prepare_handler_code(service(tmp_path, ["./twice_handlers.py"]), cwd=tmp_path)
        code.import_here(HandlerRegistry())
        again = prepare_handler_code(code.config, cwd=tmp_path)
        assert again.runtime_env == code.runtime_env
        assert again.modules == code.modules

    def test_a_missing_module_names_the_entry_and_the_directory_searched(
        self, tmp_path: Path
    ) -> None:
        """Not on the path and not in the cwd: handlers.N, the module and the cwd are named."""
        config = service(tmp_path, ["workers.demo_models", "nowhere_handlers"])
        with pytest.raises(HandlerCodeError) as info:
            prepare_handler_code(config, cwd=tmp_path)
        message = str(info.value)
        assert message.startswith("handlers.1: handler module 'nowhere_handlers' not found")
        assert f"in {tmp_path} (the directory the service starts in)" in message

    def test_a_missing_file_is_named(self, tmp_path: Path) -> None:
        """A file entry that does not exist: handlers.N and its absolute path."""
        with pytest.raises(HandlerCodeError, match=r"handlers\.0: .*/app/gone\.py: no such file"):
            prepare_handler_code(service(tmp_path, ["./gone.py"]), cwd=tmp_path)

    def test_a_file_named_like_an_installed_module_is_refused(self, tmp_path: Path) -> None:
        """./json.py would be imported as json, which the standard library already is."""
        write_handler(tmp_path / "app", "json", "json_job")
        with pytest.raises(HandlerCodeError, match=r"handlers\.0: .*imported as 'json'.*rename"):
            prepare_handler_code(service(tmp_path, ["./json.py"]), cwd=tmp_path)

    def test_code_from_two_directories_needs_runtime_env_to_say_how(self, tmp_path: Path) -> None:
        """Two directories of own code cannot both be the working_dir: an error naming both,
        unless runtime_env names the code itself (then nothing is added)."""
        write_handler(tmp_path / "app", "one_handlers", "one_handlers_job")
        write_handler(tmp_path / "app" / "more", "two_handlers", "two_handlers_job")
        handlers = ["./one_handlers.py", "./more/two_handlers.py"]
        with pytest.raises(HandlerCodeError, match="come from 2 directories"):
            prepare_handler_code(service(tmp_path, handlers), cwd=tmp_path)
        code = prepare_handler_code(
            service(
                tmp_path, handlers, runtime_env={"py_modules": ["./one_handlers.py", "./more"]}
            ),
            cwd=tmp_path,
        )
        assert not code.default_working_dir
        env = code.runtime_env
        assert env is not None
        assert "working_dir" not in env
        assert [p.field for p in code.packages] == [
            "runtime_env.py_modules.0",
            "runtime_env.py_modules.1",
        ]

    def test_a_working_dir_given_is_kept(self, tmp_path: Path) -> None:
        """runtime_env.working_dir in the config wins over the default."""
        write_handler(tmp_path / "app", "kept_handlers", "kept_handlers_job")
        (tmp_path / "code").mkdir()
        code = prepare_handler_code(
            service(tmp_path, ["./kept_handlers.py"], runtime_env={"working_dir": "../code"}),
            cwd=tmp_path,
        )
        assert not code.default_working_dir
        env = code.runtime_env
        assert env is not None
        assert env["working_dir"] == str(tmp_path / "code")

    def test_an_installed_handler_also_in_the_shipped_directory_is_refused(
        self, tmp_path: Path
    ) -> None:
        """The workers put working_dir first on their path: a second copy there of an installed
        handler package would be the one they import."""
        write_handler(tmp_path / "app", "mine_handlers", "mine_handlers_job")
        (tmp_path / "app" / "workers").mkdir()
        (tmp_path / "app" / "workers" / "__init__.py").write_text("")
        config = service(tmp_path, ["./mine_handlers.py", "workers.demo_models"])
        with pytest.raises(HandlerCodeError, match=r"handlers\.1: 'workers' is on the Python path"):
            prepare_handler_code(config, cwd=tmp_path)


class TestRuntimeEnvChecks:
    def test_paths_that_do_not_exist_are_named(self, tmp_path: Path) -> None:
        """working_dir, py_modules and a requirements file are checked before Ray sees them."""
        write_handler(tmp_path / "app", "path_handlers", "path_handlers_job")
        cases = {
            "runtime_env.working_dir: ": {"working_dir": "./nope"},
            "runtime_env.py_modules.0: ": {"py_modules": ["./nope.py"]},
            "runtime_env.pip: ": {"pip": "./requirements.txt"},
        }
        for field, raw in cases.items():
            config = service(tmp_path, ["./path_handlers.py"], runtime_env=raw)
            with pytest.raises(RuntimeEnvError) as info:
                prepare_handler_code(config, cwd=tmp_path)
            assert str(info.value).startswith(field)
            assert "relative to the config file" in str(info.value)

    def test_ray_s_own_validation_names_the_field(self, tmp_path: Path) -> None:
        """A working_dir URI Ray cannot unpack is refused by Ray's validator, naming the field."""
        config = service(
            tmp_path, ["workers.demo_models"], runtime_env={"working_dir": "s3://bucket/code"}
        )
        with pytest.raises(RuntimeEnvError) as info:
            prepare_handler_code(config, cwd=tmp_path)
        assert str(info.value).startswith("runtime_env.working_dir: Only .zip")
        assert "\n" not in str(info.value)

    def test_measure_counts_what_ray_would_upload(self, tmp_path: Path) -> None:
        """Ray's walk: default excludes, the user's excludes, .gitignore and .rayignore files."""
        root = tmp_path / "code"
        for rel, size in {
            "handlers.py": 100,
            "pkg/util.py": 50,
            ".venv/lib/big.so": 5000,
            ".git/objects/x": 5000,
            "data/table.bin": 4000,
            "notes.log": 700,
            "cache.tmp": 300,
        }.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"x" * size)
        (root / ".gitignore").write_bytes(b"*.log\n")
        (root / ".rayignore").write_bytes(b"*.tmp\n")
        files, size, largest = measure(root, [".venv", "data/"])
        ignore_files = len(b"*.log\n") + len(b"*.tmp\n")
        assert (files, size) == (4, 150 + ignore_files)
        assert largest[0] == ("handlers.py", 100)
        assert ("pkg/", 50) in largest

    def test_a_working_dir_over_ray_s_limit_fails_here_naming_its_largest_entries(
        self, tmp_path: Path, restore_import_state: None
    ) -> None:
        """Ray refuses a package at its gRPC limit; a (sparse) file over it fails the preparation
        with one line naming the field, the directory, why it is shipped and the largest entry."""
        project = tmp_path / "project"
        write_handler(project, "big_handlers", "big_handlers_job")
        limit = ray_package_limit_bytes()
        with (project / "weights.bin").open("wb") as f:
            f.truncate(limit + 1)  # sparse: no disk used
        with pytest.raises(RuntimeEnvError) as info:
            prepare_handler_code(service(tmp_path, ["big_handlers"]), cwd=project)
        message = str(info.value)
        assert message.startswith(f"runtime_env.working_dir: {project.resolve()} (the directory")
        assert "handler module big_handlers, shipped by default" in message
        assert f"weights.bin {(limit + 1) / 2**20:.1f} MiB" in message
        assert "runtime_env.excludes" in message
        assert "\n" not in message
        # Excluded, it is not counted.
        code = prepare_handler_code(
            service(tmp_path, ["big_handlers"], runtime_env={"excludes": ["*.bin"]}), cwd=project
        )
        assert code.packages[0].size_bytes < 1024


class TestImportErrors:
    def test_a_module_that_raises_is_named_with_its_file(
        self, tmp_path: Path, restore_import_state: None
    ) -> None:
        """An error inside the module: its name, its file, and the exception."""
        (tmp_path / "raising_handlers.py").write_text("raise RuntimeError('no GPU here')\n")
        code = prepare_handler_code(
            ServiceConfig.from_mapping(
                {
                    "queues": [{"name": "q", "job_types": ["x"]}],
                    "allocation": {"budget": 1},
                    "handlers": ["raising_handlers"],
                }
            ),
            cwd=tmp_path,
        )
        with pytest.raises(HandlerModuleError) as info:
            code.import_here(HandlerRegistry())
        message = str(info.value)
        assert f"'raising_handlers' ({tmp_path / 'raising_handlers.py'}) failed" in message
        assert "RuntimeError: no GPU here" in message

    def test_a_missing_dependency_is_told_from_a_missing_module(
        self, tmp_path: Path, restore_import_state: None
    ) -> None:
        """The module is there but imports something that is not: that one is named."""
        (tmp_path / "needy_handlers.py").write_text("import no_such_dependency_xyz\n")
        code = prepare_handler_code(
            ServiceConfig.from_mapping(
                {
                    "queues": [{"name": "q", "job_types": ["x"]}],
                    "allocation": {"budget": 1},
                    "handlers": ["needy_handlers"],
                }
            ),
            cwd=tmp_path,
        )
        with pytest.raises(HandlerModuleError, match="imports 'no_such_dependency_xyz'"):
            code.import_here(HandlerRegistry())

    def test_not_found_here_lists_the_directories_searched(self) -> None:
        """A process that cannot find a module says where it looked, cwd included."""
        from workers.registry import load_handler_modules

        with pytest.raises(HandlerModuleError) as info:
            load_handler_modules(["surely_absent_handlers"], HandlerRegistry())
        assert "no module 'surely_absent_handlers' on the Python path" in str(info.value)
        assert f"working directory {os.getcwd()}" in str(info.value)
