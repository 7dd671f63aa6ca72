"""Result tables that stay readable at any width, in a terminal or a pipe.

Rich fits a table that is too wide by cutting every column evenly, numbers included (`816…`). Here
the widths are chosen first: every number column gets the width of its longest cell (a header
wraps at its spaces instead), text columns wrap, and only the name column is shortened, with an
ellipsis, to what is left. The gaps between columns narrow before a name is cut. When even that
does not fit, the table is drawn wider than the console: a wrapped line can be read, a cut number
cannot. Policies given as checkpoint paths are shown by their file stem (`policy_label`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich import box
from rich.console import Console
from rich.table import Table

# A name column is cut no shorter than this: below it, the table is drawn wider instead.
MIN_NAME_WIDTH = 8
# Spaces between columns, widest first: they narrow before any name is cut.
_GAPS = (3, 2, 1)


def policy_label(name: str, known: Iterable[str] = ()) -> str:
    """How a table shows a policy: a registry name (or 'learned') as given; a checkpoint path
    by its file stem, or by its file name when the stem is one of the `known` names (a checkpoint
    called `static.pt` must not read as the heuristic)."""
    known = set(known)
    if name in known or ("/" not in name and Path(name).suffix not in (".pt", ".json")):
        return name
    path = Path(name)
    stem = path.stem if path.suffix in (".pt", ".json") else path.name
    return path.name if stem in known or not stem else stem


@dataclass(frozen=True)
class Column:
    """A table column: `number` cells are never cut or wrapped, `text` cells wrap at spaces,
    `name` cells (one column per table) are shortened with an ellipsis when space runs out."""

    header: str
    kind: Literal["name", "number", "text"] = "number"


def _wrap_words(text: str, width: int) -> str:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


def _longest_word(texts: Iterable[str]) -> int:
    return max((len(word) for text in texts for word in text.split()), default=1)


def _widths(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], available: int
) -> tuple[list[int], int]:
    """Content widths per column, and the gap between columns, for a console `available` wide
    (the result may be wider when nothing else fits). In order of preference: every header on
    one line; number headers wrapped at their spaces; then names and text cut to what is left."""
    gaps = len(columns) - 1
    full: list[int] = []  # every cell and header on one line
    compact: list[int] = []  # number headers wrapped; names and text as they are
    least: list[int] = []  # names cut to MIN_NAME_WIDTH, text wrapped to its longest word
    for i, column in enumerate(columns):
        values = [row[i] for row in rows]
        longest = max((len(v) for v in values), default=0)
        full.append(max(longest, len(column.header)))
        if column.kind == "number":
            compact.append(max(longest, _longest_word([column.header])))
            least.append(compact[-1])
        elif column.kind == "text":
            compact.append(full[-1])
            least.append(_longest_word([*values, column.header]))
        else:
            compact.append(full[-1])
            least.append(min(full[-1], max(MIN_NAME_WIDTH, _longest_word([column.header]))))
    for gap in _GAPS:
        if sum(full) + gap * gaps <= available:
            return full, gap
    for gap in _GAPS:
        if sum(compact) + gap * gaps <= available:
            return _widen(compact, full, available - sum(compact) - gap * gaps), gap
    gap = _GAPS[-1]
    widths = list(least)
    spare = available - sum(widths) - gap * gaps
    # What is left goes to the name first (names are short, and a cut one is ambiguous), then to
    # number headers so that none takes more than two lines, then to the text.
    two_lines = [
        max(w, _two_line_width(c.header)) if c.kind == "number" else w
        for c, w in zip(columns, widths, strict=True)
    ]
    for kind, target in (("name", compact), ("number", two_lines), ("text", compact)):
        for i, column in enumerate(columns):
            if column.kind == kind and spare > 0:
                extra = min(spare, max(target[i] - widths[i], 0))
                widths[i] += extra
                spare -= extra
    return _widen(widths, full, spare), gap


def _two_line_width(header: str) -> int:
    """The narrowest width at which `header` wraps onto at most two lines."""
    words = header.split()
    return min(
        (max(len(" ".join(words[:k])), len(" ".join(words[k:]))) for k in range(1, len(words))),
        default=len(header),
    )


def _widen(widths: list[int], full: list[int], spare: int) -> list[int]:
    """`widths` with `spare` columns given to the columns whose header would wrap, those that
    need the least first, so that as many headers as possible stay on one line."""
    widths = list(widths)
    for i in sorted(range(len(widths)), key=lambda i: full[i] - widths[i]):
        need = full[i] - widths[i]
        if 0 < need <= spare:
            widths[i] += need
            spare -= need
    return widths


def fitted_table(
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    width: int,
    *,
    caption: str | None = None,
    row_styles: Sequence[str | None] | None = None,
) -> tuple[Table, int]:
    """The table, laid out for a console `width` wide, and the width it needs (more than
    `width` only when its numbers would not fit otherwise)."""
    widths, gap = _widths(columns, rows, width)
    table = Table(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        # The box's own divider is one space; the padding makes up the rest of the gap.
        padding=(0, gap - 1, 0, 0),
    )
    for column, w in zip(columns, widths, strict=True):
        header = column.header if column.kind == "text" else _wrap_words(column.header, w)
        table.add_column(
            header,
            justify="right" if column.kind == "number" else "left",
            width=w,
            no_wrap=column.kind != "text",
            overflow="ellipsis" if column.kind == "name" else "fold",
        )
    for i, row in enumerate(rows):
        table.add_row(*row, style=row_styles[i] if row_styles is not None else None)
    needed = sum(widths) + gap * (len(columns) - 1) + (gap - 1)
    return table, max(width, needed)


def print_table(
    console: Console,
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    caption: str | None = None,
    row_styles: Sequence[str | None] | None = None,
) -> None:
    """Prints the table fitted to `console` (see the module docstring)."""
    table, needed = fitted_table(
        title, columns, rows, console.width, caption=caption, row_styles=row_styles
    )
    if needed > console.width:
        # Wider than the console: the terminal wraps the lines, but every number stays whole.
        console = Console(
            width=needed, file=console.file, force_terminal=console.is_terminal, highlight=False
        )
    console.print(table)
