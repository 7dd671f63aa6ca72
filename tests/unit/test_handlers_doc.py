"""docs/handlers.md shows the committed example (docs/examples), not a copy that drifted from it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

DOCS = Path(__file__).resolve().parents[2] / "docs"


def blocks(language: str) -> list[str]:
    text = (DOCS / "handlers.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_service_yaml_shown_is_the_example_s() -> None:
    """The first YAML block of the page is docs/examples/my_service.yaml, comments aside."""
    shown = yaml.safe_load(blocks("yaml")[0])
    committed = yaml.safe_load((DOCS / "examples" / "my_service.yaml").read_text())
    assert shown == committed


def test_the_handler_code_shown_is_in_the_example() -> None:
    """Every line of the page's handler module, bar the elided bodies, is in my_handlers.py, and
    in the same order."""
    source = (DOCS / "examples" / "my_handlers.py").read_text().splitlines()
    shown = [
        line
        for line in blocks("python")[0].splitlines()
        if line.strip() and line.strip() != "..." and not line.rstrip().endswith(": ...")
    ]
    assert len(shown) > 20
    position = 0
    for line in shown:
        assert line in source[position:], f"not in docs/examples/my_handlers.py (in order): {line}"
        position = source.index(line, position) + 1
