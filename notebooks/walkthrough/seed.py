"""The seed's code beside ours: MAX serve's excerpts (stored as text, so the notebook runs offline) next to
`inspect.getsource` of the toolkit, as a two-column HTML table that nbconvert and GitHub render as it is."""

from __future__ import annotations

import html
import inspect
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXCERPTS = Path(__file__).with_name("max_serve_model_worker_d7a8d034d.txt")


def seed_excerpts(path: Path = EXCERPTS) -> dict[str, str]:
    """The stored excerpts by section title (the text after '=== '); the file's header is under 'header'."""
    sections: dict[str, list[str]] = {"header": []}
    current = "header"
    for line in path.read_text().splitlines():
        if line.startswith("=== "):
            current = line[4:]
            sections[current] = []
        else:
            sections[current].append(line)
    return {title: "\n".join(lines).strip("\n") for title, lines in sections.items()}


def source_of(*functions: Callable[..., Any]) -> str:
    """The source of each function, with its file and first line, one after the other."""
    parts = []
    for fn in functions:
        lines, first = inspect.getsourcelines(fn)
        where = f"# {fn.__module__}.{fn.__qualname__}  ({Path(inspect.getsourcefile(fn) or '').name}:{first})"
        parts.append(where + "\n" + textwrap.dedent("".join(lines)).rstrip("\n"))
    return "\n\n".join(parts)


def side_by_side(left_title: str, left: str, right_title: str, right: str) -> str:
    """A two-column HTML table of two code listings, top-aligned, each cell scrolling on its own."""
    style = "text-align:left;vertical-align:top;font-size:11px;line-height:1.25"
    pre = "margin:0;white-space:pre-wrap;overflow-wrap:anywhere"  # long lines wrap instead of being cut off

    def cell(code: str) -> str:
        return f'<td style="{style}"><pre style="{pre}">{html.escape(code)}</pre></td>'

    return (f'<table style="table-layout:fixed;width:100%"><tr><th style="{style}">{html.escape(left_title)}</th>'
            f'<th style="{style}">{html.escape(right_title)}</th></tr><tr>{cell(left)}{cell(right)}</tr></table>')
