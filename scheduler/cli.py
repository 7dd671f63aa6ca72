"""The `bilevel` command line."""

from __future__ import annotations

import typer

from scheduler.commands import demo, evaluate, serve, simulate, status, submit, train, tune

app = typer.Typer(
    name="bilevel",
    help="Dynamic task scheduling for ML workloads on Ray, with learned two-level routing.",
    no_args_is_help=True,
    add_completion=False,
)

# Each module registers its own commands on the app.
for _module in (demo, evaluate, serve, simulate, status, submit, train, tune):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
