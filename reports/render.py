"""Render a report, built as a list of blocks, to Markdown and to one self-contained HTML file.

One block list feeds both outputs, so report.md and report.html never disagree. No timestamps or absolute
paths go into either: rendering the same study twice gives byte-identical files.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import pandas as pd


@dataclass(frozen=True)
class Heading:
    """A section title (level 1-3)."""

    level: int
    text: str


@dataclass(frozen=True)
class Para:
    """A paragraph; may use **bold** and `code`."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A bulleted list of inline-formatted items."""

    items: list[str]


@dataclass(frozen=True)
class Table:
    """A DataFrame rendered as a table; `formats` maps column -> cell formatter."""

    frame: pd.DataFrame
    formats: dict[str, Callable[[Any], str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Fig:
    """A figure written by figures.py: figures/<stem>.png (embedded in HTML) and .svg (linked from Markdown)."""

    stem: str  # figures/<stem>.png and .svg
    caption: str


Block = Union[Heading, Para, Bullets, Table, Fig]


def fmt_value(value: Any) -> str:
    """Stable cell text: floats to 4 significant digits, NaN/None as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cells(table: Table) -> tuple[list[str], list[list[str]]]:
    cols = [str(c) for c in table.frame.columns]
    rows = [[table.formats.get(c, fmt_value)(v) for c, v in zip(cols, rec)]
            for rec in table.frame.itertuples(index=False, name=None)]
    return cols, rows


def to_markdown(blocks: list[Block], fig_dir: str = "figures") -> str:
    """Markdown with relative figure links (``figures/<stem>.png``)."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            cols, rows = _cells(b)
            esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines = ["| " + " | ".join(map(esc, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
            lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
            out.append("\n".join(lines))
        elif isinstance(b, Fig):
            out.append(f"![{b.caption}]({fig_dir}/{b.stem}.png)\n\n*{b.caption}* ([SVG]({fig_dir}/{b.stem}.svg))")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    s = html.escape(text, quote=False)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;
color:#222;line-height:1.45}
table{border-collapse:collapse;margin:0.8rem 0;font-size:0.9rem}
th,td{border:1px solid #ccc;padding:0.25rem 0.5rem;text-align:left;vertical-align:top}
th{background:#f2f2f2} tr:nth-child(even) td{background:#fafafa}
figure{margin:1.2rem 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-style:italic;color:#444} code{background:#f4f4f4;padding:0 0.2rem}
.supported{color:#00704a;font-weight:600} .contradicted{color:#b3261e;font-weight:600}
.inconclusive{color:#555;font-weight:600}
"""


def to_html(blocks: list[Block], title: str, fig_dir: Path) -> str:
    """One HTML file with every figure embedded as base64 PNG (opens anywhere, no sidecar files)."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            cols, rows = _cells(b)
            head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
            body = "".join("<tr>" + "".join(_td(c, v) for c, v in zip(cols, r)) + "</tr>" for r in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Fig):
            data = base64.b64encode((fig_dir / f"{b.stem}.png").read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(b.caption)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{_inline(b.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _td(col: str, value: str) -> str:
    cls = f' class="{value}"' if col == "verdict" and value in ("supported", "contradicted", "inconclusive") else ""
    return f"<td{cls}>{html.escape(value)}</td>"
