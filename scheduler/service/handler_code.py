"""Where the service's handler code comes from, and how every process of the service imports it.

`handlers:` entries are module names or .py files (see scheduler.config). `prepare_handler_code`
locates them in the serving process before anything starts:

- a module name found on the Python path (installed, or on a PYTHONPATH set on every node) is taken
  to be importable on every node as it is;
- a module name found only in the directory the service starts in, and a .py file, are the
  service's own code. Unless runtime_env names code itself (working_dir or py_modules), their
  directory becomes runtime_env.working_dir: Ray uploads it when `serve` starts its Ray job and
  unpacks it on every node, where the control plane and the model workers run in it and import
  from it (Ray puts it first on their PYTHONPATH).

Then the runtime_env is checked the way Ray checks it, one field at a time so that an error names
its field, and every local directory it would upload is measured against Ray's limit for one
package, so an oversized working_dir fails here, naming its largest entries, and not halfway into
`ray.init`. Once Ray runs, `ImportCheck` imports the handler modules in a Ray worker with the same
environment: a pip spec Ray cannot install, or a module the workers cannot import, stops the start
with one line naming the field (and the start stops whatever it had started).

    code = prepare_handler_code(config)     # HandlerCodeError / RuntimeEnvError name the field
    code.import_here()                      # the serving process imports them as the workers will
    ray.init(runtime_env=code.runtime_env)  # what ensure_ray does
    check_on_workers(code)                  # {module: the file a worker imported}
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.config import ConfigError, RuntimeEnvConfig, ServiceConfig, is_handler_file, is_uri
from workers.registry import REGISTRY, HandlerModuleError, HandlerRegistry, load_handler_modules

MIB = 1024 * 1024

# How much longer than runtime_env.setup_timeout_s the start waits for a worker to import the
# handlers: starting the worker process and importing them (torch, say) come on top of the setup.
IMPORT_MARGIN_S = 60.0


class HandlerCodeError(ConfigError):
    """A handler module cannot be found, imported or shipped; names the entry and where it looked."""


class RuntimeEnvError(ConfigError):
    """The runtime_env is invalid, too large to upload, or Ray could not set it up; names the field."""


@dataclass(frozen=True, slots=True)
class Package:
    """A local directory or file that Ray uploads for the service, as measured before it does."""

    field: str
    path: Path
    files: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class HandlerCode:
    """The handler modules of a service and what Ray must give its workers to import them.

    `config` is the service config to run: `handlers` as module names (a file becomes its module
    name), `runtime_env` with the default working_dir filled in when one is needed.
    """

    config: ServiceConfig
    # The directories of the handler modules that are not installed, each with those modules.
    local: tuple[tuple[Path, tuple[str, ...]], ...]
    # Whether runtime_env.working_dir is the local directory because the config named no code.
    default_working_dir: bool
    packages: tuple[Package, ...]

    @property
    def modules(self) -> tuple[str, ...]:
        return self.config.handlers

    @property
    def local_modules(self) -> tuple[str, ...]:
        """The handler modules that are not installed (the service's own code)."""
        return tuple(m for _, modules in self.local for m in modules)

    @property
    def runtime_env(self) -> dict[str, Any] | None:
        """What the service's Ray job runs with; None when Ray has nothing to install."""
        return self.config.runtime_env.to_ray() or None

    def import_here(self, registry: HandlerRegistry = REGISTRY) -> HandlerRegistry:
        """Import the handler modules into this process, from where the workers import them: the
        local directory first on the path, as Ray puts the working_dir first on theirs."""
        for directory, _ in reversed(self.local):
            if str(directory) not in sys.path:
                sys.path.insert(0, str(directory))
        return load_handler_modules(self.modules, registry)

    def summary(self) -> list[str]:
        """What is shipped, a line per package, for the serve banner (none when nothing is)."""
        lines = []
        for p in self.packages:
            why = ""
            if p.field == "runtime_env.working_dir" and self.default_working_dir:
                modules = ", ".join(self.local_modules)
                why = f"; the directory of handler module {modules}, which is not installed"
            lines.append(
                f"shipping {p.path} to every node as {p.field} "
                f"({p.files} files, {_size(p.size_bytes)}{why})"
            )
        return lines


def prepare_handler_code(config: ServiceConfig, *, cwd: Path | None = None) -> HandlerCode:
    """Locate the handler modules of `config` (module names also in `cwd`, default the current
    directory), fill in the default working_dir, and check the runtime_env as Ray will."""
    cwd = (cwd or Path.cwd()).absolute()
    names: list[str] = []
    local: dict[Path, list[str]] = {}
    for i, entry in enumerate(config.handlers):
        directory: Path | None
        if is_handler_file(entry):
            name, directory = _locate_file(i, Path(entry))
        else:
            name, directory = entry, _locate_module(i, entry, cwd)
        if name in names:
            raise HandlerCodeError(f"handlers.{i}: module {name!r} is listed twice")
        names.append(name)
        if directory is not None:
            local.setdefault(directory, []).append(name)
    env = config.runtime_env
    default = bool(local) and not env.names_code
    if default:
        if len(local) > 1:
            where = "; ".join(f"{d}: {', '.join(m)}" for d, m in local.items())
            raise HandlerCodeError(
                f"handlers: the modules that are not installed come from {len(local)} "
                f"directories ({where}), and Ray ships one working_dir: put them in one "
                "directory, or ship them yourself with runtime_env.py_modules"
            )
        env = env.model_copy(update={"working_dir": str(next(iter(local)))})
    _check_not_shadowed(config.handlers, names, env)
    _check_paths(env)
    _check_with_ray(env)
    shipped_for = tuple(m for modules in local.values() for m in modules) if default else ()
    packages = _measure_packages(env, default_for=shipped_for)
    config = config.model_copy(update={"handlers": tuple(names), "runtime_env": env})
    local_dirs = tuple((d, tuple(m)) for d, m in local.items())
    return HandlerCode(config, local_dirs, default, packages)


def _locate_file(i: int, path: Path) -> tuple[str, Path]:
    if not path.is_file():
        raise HandlerCodeError(
            f"handlers.{i}: {path}: no such file (a relative path is relative to the config file)"
        )
    name = path.stem
    taken = _find_spec(name)
    origin = _origin(taken) if taken is not None else None
    if taken is not None and (origin is None or Path(origin).resolve() != path.resolve()):
        raise HandlerCodeError(
            f"handlers.{i}: {path} would be imported as {name!r}, which is already "
            f"{origin or 'a package'} on the Python path: rename the file"
        )
    return name, path.parent.resolve()


def _locate_module(i: int, name: str, cwd: Path) -> Path | None:
    """None for a module on the Python path; `cwd` for one found only there."""
    top = name.partition(".")[0]
    if _find_spec(top) is not None:
        return None
    if importlib.machinery.PathFinder.find_spec(top, [str(cwd)]) is not None:
        return cwd.resolve()
    raise HandlerCodeError(
        f"handlers.{i}: handler module {name!r} not found: it is not on the Python path, and "
        f"there is no {top}.py or {top}/ in {cwd} (the directory the service starts in); start "
        f"the service there, or name the file (handlers: [path/to/{top}.py], relative to the "
        "config file)"
    )


def _find_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _origin(spec: importlib.machinery.ModuleSpec) -> str | None:
    if spec.origin in (None, "built-in", "frozen"):
        return None if spec.origin is None else f"a {spec.origin} module"
    return spec.origin


def _check_not_shadowed(entries: tuple[str, ...], names: list[str], env: RuntimeEnvConfig) -> None:
    """A handler module found on the Python path must not also be in the shipped directory: the
    workers, which have that directory first on their path, would import the other one."""
    if env.working_dir is None or is_uri(env.working_dir):
        return
    shipped = Path(env.working_dir).resolve()
    for i, (entry, name) in enumerate(zip(entries, names, strict=True)):
        if is_handler_file(entry):
            continue
        top = name.partition(".")[0]
        installed = _find_spec(top)
        if installed is None:
            continue
        origin = _origin(installed)
        here = importlib.machinery.PathFinder.find_spec(top, [str(shipped)])
        if here is None or (origin is not None and _inside(Path(origin), shipped)):
            continue
        raise HandlerCodeError(
            f"handlers.{i}: {top!r} is on the Python path ({origin or 'a namespace package'}) and "
            f"also in {shipped}, which is shipped as runtime_env.working_dir, where the workers "
            "would import that one instead: rename one of them"
        )


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory)


def _check_paths(env: RuntimeEnvConfig) -> None:
    """Local paths exist: the message says what a relative path was relative to."""
    relative = "(a relative path is relative to the config file)"
    local_dir = env.working_dir is not None and not is_uri(env.working_dir)
    if local_dir and not Path(str(env.working_dir)).is_dir():
        raise RuntimeEnvError(
            f"runtime_env.working_dir: {env.working_dir} is not a directory {relative}"
        )
    for i, module in enumerate(env.py_modules):
        if not is_uri(module) and not Path(module).exists():
            raise RuntimeEnvError(f"runtime_env.py_modules.{i}: {module} does not exist {relative}")
    if isinstance(env.pip, str) and not Path(env.pip).is_file():
        raise RuntimeEnvError(f"runtime_env.pip: {env.pip} is not a requirements file {relative}")


def _check_with_ray(env: RuntimeEnvConfig) -> None:
    """Ray's own validation (what ray.init runs), field by field so the error names the field."""
    from ray.runtime_env import RuntimeEnv

    for key, value in env.to_ray().items():
        try:
            RuntimeEnv(**{key: value})
        except (ValueError, TypeError) as exc:
            raise RuntimeEnvError(f"runtime_env.{key}: {_one_line(str(exc))}") from None


def ray_package_limit_bytes() -> int:
    """The largest package Ray uploads (its gRPC message limit: 512 MiB in Ray 2.60, less in
    older releases, RAY_max_grpc_message_size where set)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    limit: int = GCS_STORAGE_MAX_SIZE
    return limit


def _measure_packages(
    env: RuntimeEnvConfig, *, default_for: tuple[str, ...], limit_bytes: int | None = None
) -> tuple[Package, ...]:
    limit = limit_bytes if limit_bytes is not None else ray_package_limit_bytes()
    excludes = list(env.to_ray().get("excludes", []))
    targets: list[tuple[str, Path]] = []
    if env.working_dir is not None and not is_uri(env.working_dir):
        targets.append(("runtime_env.working_dir", Path(env.working_dir)))
    targets += [
        (f"runtime_env.py_modules.{i}", Path(m))
        for i, m in enumerate(env.py_modules)
        if not is_uri(m)
    ]
    packages = []
    for field, path in targets:
        files, size, largest = measure(path, excludes, stop_above_bytes=limit)
        if size >= limit:
            biggest = ", ".join(f"{name} {_size(n)}" for name, n in largest[:3])
            why = (
                f" (the directory of handler module {', '.join(default_for)}, shipped by default)"
                if default_for and field == "runtime_env.working_dir"
                else ""
            )
            raise RuntimeEnvError(
                f"{field}: {path}{why} holds at least {_size(size)} to upload (largest: "
                f"{biggest}), and Ray refuses a package of {_size(limit)} or more: leave large "
                "files out with runtime_env.excludes (gitignore patterns) or a .rayignore file, "
                "or point runtime_env.working_dir at a directory holding only the code"
            )
        packages.append(Package(field, path, files, size))
    return tuple(packages)


class _Full(Exception):
    pass


# Ray's walk logs the exception that stops it early (and the ignore files it reads) as its own
# errors; here neither is one.
_QUIET = logging.getLogger("bilevel.package_walk")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def measure(
    path: Path, excludes: list[str], *, stop_above_bytes: int | None = None
) -> tuple[int, int, list[tuple[str, int]]]:
    """Files and bytes Ray would pack from `path`, and the sizes of its top-level entries, largest
    first. Uses Ray's own walk (its default excludes, `excludes`, .gitignore and .rayignore files),
    so it counts what Ray uploads; sizes are before compression, as Ray's limit is documented.
    Stops counting once past `stop_above_bytes`."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    path = path.absolute()
    if path.is_file():
        size = path.stat().st_size
        return 1, size, [(path.name, size)]
    files, total = 0, 0
    by_entry: dict[str, int] = {}

    def count(p: Path) -> None:
        nonlocal files, total
        if not p.is_file():
            return
        size = p.stat().st_size
        files += 1
        total += size
        top = p.relative_to(path).parts[0]
        key = top + ("/" if (path / top).is_dir() else "")
        by_entry[key] = by_entry.get(key, 0) + size
        if stop_above_bytes is not None and total >= stop_above_bytes:
            raise _Full

    all_excludes = [*ray_constants.get_runtime_env_default_excludes(), *excludes]
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    walk: Callable[..., None] = _dir_travel
    with contextlib.suppress(_Full):
        walk(
            path,
            [_get_excludes(path, all_excludes)],
            count,
            include_gitignore=include_gitignore,
            logger=_QUIET,
        )
    return files, total, sorted(by_entry.items(), key=lambda kv: -kv[1])


def _size(n: int) -> str:
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


# -- once Ray runs ----------------------------------------------------------------------------------


def needs_job_level(env: dict[str, Any]) -> str | None:
    """The field of `env` that Ray accepts only at ray.init (a local directory or file to upload),
    or None when the whole of it may also be given to one actor or task."""
    working_dir = env.get("working_dir")
    if isinstance(working_dir, str) and not is_uri(working_dir):
        return "working_dir"
    for i, module in enumerate(env.get("py_modules", [])):
        if not is_uri(module):
            return f"py_modules.{i}"
    return None


def _import_in_worker(modules: list[str]) -> dict[str, str]:
    """Runs as a Ray task: import the handler modules as a model worker does; where from."""
    load_handler_modules(modules)
    return {m: str(getattr(sys.modules[m], "__file__", None) or "(no file)") for m in modules}


class ImportCheck:
    """A Ray task that imports the handler modules in a worker set up like the model workers (the
    job's runtime_env, or `runtime_env` given to the task). `start` submits it and returns at
    once, so the service's other start-up steps overlap Ray's environment setup; `result` waits."""

    def __init__(self, code: HandlerCode, ref: Any) -> None:
        self.code = code
        self.ref = ref

    @classmethod
    def start(cls, code: HandlerCode, *, runtime_env: dict[str, Any] | None = None) -> ImportCheck:
        import ray

        task = ray.remote(num_cpus=0, max_retries=0)(_import_in_worker)
        if runtime_env:
            task = task.options(runtime_env=runtime_env)
        return cls(code, task.remote(list(code.modules)))

    @property
    def timeout_s(self) -> float:
        return self.code.config.runtime_env.setup_timeout_s + IMPORT_MARGIN_S

    def result(self) -> dict[str, str]:
        """{module: the file the worker imported}. Raises RuntimeEnvError when Ray cannot set the
        environment up, HandlerCodeError when the modules do not import there; either names the
        field in one line."""
        import ray
        from ray.exceptions import GetTimeoutError, RayTaskError, RuntimeEnvSetupError

        try:
            where: dict[str, str] = ray.get(self.ref, timeout=self.timeout_s)
        except RuntimeEnvSetupError as exc:
            raise runtime_env_refused(self.code.runtime_env or {}, exc) from None
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            reason = str(cause) if isinstance(cause, HandlerModuleError) else _one_line(str(cause))
            raise HandlerCodeError(
                f"handlers: a Ray worker cannot import the handler modules: {reason}. Ship them "
                "with runtime_env (working_dir or py_modules), or install them on every node"
            ) from None
        except GetTimeoutError:
            self.cancel()
            raise RuntimeEnvError(
                f"runtime_env: a Ray worker with it was not ready within {self.timeout_s:g} s "
                f"(runtime_env.setup_timeout_s is {self.code.config.runtime_env.setup_timeout_s})"
            ) from None
        return where

    def cancel(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.cancel(self.ref, force=True)


def check_on_workers(
    code: HandlerCode, *, runtime_env: dict[str, Any] | None = None
) -> dict[str, str]:
    """ImportCheck, started and waited for."""
    return ImportCheck.start(code, runtime_env=runtime_env).result()


def runtime_env_refused(env: Mapping[str, Any], exc: BaseException) -> RuntimeEnvError:
    """Ray's refusal of the runtime_env `env` (at upload or setup) as one line naming the field it
    concerns."""
    text = "".join(traceback.format_exception(exc))
    return RuntimeEnvError(
        f"runtime_env.{_blame(env, text)}: Ray could not set it up: {_salient_line(text)}"
    )


# Per field, what in Ray's report shows that field's plugin raised it.
_PLUGIN_TRACES = {
    "pip": re.compile(r"\bpip\b"),
    "working_dir": re.compile(r"working_dir|Package size"),
    "py_modules": re.compile(r"py_modules"),
    "env_vars": re.compile(r"env_vars"),
}


def _blame(env: Mapping[str, Any], text: str) -> str:
    """Which field an error of Ray's is about: the one whose plugin raised it, else the one field
    that needs setting up."""
    for field, trace in _PLUGIN_TRACES.items():
        if env.get(field) and trace.search(text):
            return field
    given = [f for f, v in env.items() if f not in ("excludes", "config") and v]
    return given[0] if len(given) == 1 else "(runtime_env)"


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)")


def _salient_line(text: str) -> str:
    """The line of a Ray error report that says what went wrong: pip's ERROR line, else the last
    exception's message (its first sentence), else the first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("ERROR:"):
            return _one_line(line)
    for line in reversed(lines):
        match = _EXCEPTION_LINE.match(line)
        if match and "Traceback" not in line:
            return _one_line(f"{match.group(1)}: {match.group(2)}")
    return _one_line(lines[0] if lines else "no reason given")


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    sentence = re.split(r"(?<=[a-z0-9)'\"])\. (?=[A-Z])", line, maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 1] + "…"


__all__ = [
    "HandlerCode",
    "HandlerCodeError",
    "ImportCheck",
    "Package",
    "RuntimeEnvError",
    "check_on_workers",
    "measure",
    "needs_job_level",
    "prepare_handler_code",
    "ray_package_limit_bytes",
    "runtime_env_refused",
]
