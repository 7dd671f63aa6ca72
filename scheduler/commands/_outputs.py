"""Output files of the commands: checked before any work, and a late failure reported in one line.

A run can take minutes (a simulation of a long trace, a training budget); a bad output path found
only when the results are written would waste it. So every command checks its output paths first
(`check_output`, `check_plot`), exiting 2 with a line naming the option and the path, and prints its
results before writing any file, so that a write that still fails (a full disk, a directory removed
meanwhile) costs the file and not the results (`write_failed`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import typer

from scheduler.commands._common import fail


def _nearest_existing(path: Path) -> Path:
    for candidate in path.parents:
        if candidate.exists():
            return candidate
    return Path(".")


def check_output(option: str, path: Path, *, create_parents: bool = False) -> None:
    """Exit(2) naming `option` and `path` unless a file can be written at `path`: it is not a
    directory, and its directory exists (with `create_parents`, the nearest existing ancestor
    does, and the missing ones will be made) and takes the file. An existing file is left as it
    was; a new one is created and removed again."""
    label = f"{option} {path}"
    if path.is_dir():
        raise fail(f"{label}: is a directory, not a file")
    if path.exists() and not path.is_file():
        raise fail(f"{label}: exists and is not a regular file")
    parent = path.parent
    if not parent.exists() and not create_parents:
        raise fail(f"{label}: directory {parent} does not exist")
    if not parent.exists():
        parent = _nearest_existing(path)
    if not parent.is_dir():
        raise fail(f"{label}: {parent} is not a directory")
    # Real probes, not os.access: they also see read-only mounts, quotas, ACLs and names too
    # long for the file system.
    try:
        if path.parent != parent:
            with tempfile.TemporaryFile(dir=parent):
                pass
        elif path.exists():
            with path.open("ab"):
                pass
        else:
            with path.open("xb"):
                pass
            path.unlink()
    except OSError as exc:
        raise fail(f"{label}: cannot write it: {exc.strerror or exc}") from None


def plot_formats() -> list[str]:
    """The file extensions matplotlib can write here (pgf only with its TeX system installed)."""
    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    formats = set(FigureCanvasBase.get_supported_filetypes())
    if shutil.which(str(matplotlib.rcParams["pgf.texsystem"])) is None:
        formats.discard("pgf")
    return sorted(formats)


def check_plot(option: str, path: Path) -> None:
    """`check_output`, then Exit(2) unless the extension names a format matplotlib writes."""
    check_output(option, path)
    formats = plot_formats()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        shown = f"extension .{suffix}" if suffix else "no extension"
        raise fail(
            f"{option} {path}: {shown}; matplotlib writes {', '.join('.' + f for f in formats)}"
        )


def write_failed(option: str, path: Path, exc: BaseException) -> typer.Exit:
    """A one-line error for a write that failed after the results were printed; Exit(1)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return fail(f"{option} {path}: could not write it: {reason}", code=1)
