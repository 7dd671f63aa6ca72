"""The `bilevel` command line."""

from __future__ import annotations

from importlib import metadata
from typing import Annotated

import typer

from scheduler.commands import (
    demo,
    dlq,
    evaluate,
    jobs,
    promote,
    record,
    replay,
    serve,
    simulate,
    status,
    submit,
    train,
    tune,
)
from scheduler.commands._common import show_layout_warnings

app = typer.Typer(
    name="bilevel",
    help="Dynamic task scheduling for ML workloads on Ray, with learned two-level routing.",
    no_args_is_help=True,
    add_completion=False,
    # Click's plain help layout: rich's option panels cut long option names to fit 80 columns
    # (`--reconfiguration-…`), while click's puts a long name on its own line and wraps the help.
    rich_markup_mode=None,
    # A traceback's locals can hold a Redis URL with its password.
    pretty_exceptions_show_locals=False,
)


def version_text() -> str:
    """`bilevel X.Y.Z`, from the installed package's metadata."""
    try:
        return f"bilevel {metadata.version('bilevel')}"
    except metadata.PackageNotFoundError:
        return "bilevel (version unknown: the package is not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Dynamic task scheduling for ML workloads on Ray, with learned two-level routing."""
    show_layout_warnings()


# Each module registers its own commands on the app.
for _module in (
    demo,
    dlq,
    evaluate,
    jobs,
    promote,
    record,
    replay,
    serve,
    simulate,
    status,
    submit,
    train,
    tune,
):
    _module.register(app)


def main() -> None:
    # Named here so `python -m scheduler.cli` shows the same usage lines as the `bilevel` script.
    app(prog_name="bilevel")


if __name__ == "__main__":
    main()
