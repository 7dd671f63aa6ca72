"""The `bilevel` command line."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="bilevel",
    help="Dynamic task scheduling for ML workloads on Ray, with learned two-level routing.",
    no_args_is_help=True,
    add_completion=False,
)

# Each module registers its own commands; a module that is missing is a bug, so import errors surface.
_COMMAND_MODULES = (
    "scheduler.commands.demo",
    "scheduler.commands.simulate",
    "scheduler.commands.train",
    "scheduler.commands.evaluate",
    "scheduler.commands.serve",
    "scheduler.commands.status",
    "scheduler.commands.submit",
)

for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:
        if exc.name != _name:
            raise
        continue
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
