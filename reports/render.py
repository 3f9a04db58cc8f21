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
    """A DataFrame rendered as a table; `formats` maps column -> cell formatter. In HTML a ``wide`` table
    scrolls sideways inside its own box instead of pushing columns off the page; ``css`` names its class."""

    frame: pd.DataFrame
    formats: dict[str, Callable[[Any], str]] = field(default_factory=dict)
    wide: bool = False
    css: str = ""


@dataclass(frozen=True)
class Callout:
    """A boxed message: ``kind`` "danger" (the instrument failed, samples are noise), "warn", "ok" or "info"."""

    kind: str
    text: str


@dataclass(frozen=True)
class Code:
    """A block of text (a spec, a config) under a one-line summary; collapsed in HTML."""

    summary: str
    text: str
    lang: str = ""


@dataclass(frozen=True)
class Fig:
    """A figure written by figures.py: figures/<stem>.png (embedded in HTML) and .svg (linked from Markdown)."""

    stem: str  # figures/<stem>.png and .svg
    caption: str


Block = Union[Heading, Para, Bullets, Table, Fig, Callout, Code]


def fmt_value(value: Any) -> str:
    """Stable cell text: floats to 4 significant digits, NaN/None as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _alt(caption: str) -> str:
    """A figure's alt text: its caption's first sentence (the caption itself follows the figure)."""
    return caption.split(". ", 1)[0].rstrip(".")


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
            out.append(f"![{_alt(b.caption)}]({fig_dir}/{b.stem}.png)\n\n*{b.caption}* ([SVG]({fig_dir}/{b.stem}.svg))")
        elif isinstance(b, Callout):
            mark = {"danger": "⛔ ", "warn": "⚠ ", "ok": "✅ "}.get(b.kind, "")
            out.append("\n".join(f"> {mark if i == 0 else ''}{line}" for i, line in enumerate(b.text.split("\n"))))
        elif isinstance(b, Code):
            fence = "````" if "```" in b.text else "```"
            out.append(f"**{b.summary}**\n\n{fence}{b.lang}\n{b.text.rstrip()}\n{fence}")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    s = html.escape(text, quote=True)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    s = re.sub(r"(?<![*\w])\*([^*\s][^*]*?)\*(?![*\w])", r"<em>\1</em>", s)
    # [text](url): only web and in-page links (the MLflow UI's); anything else stays text.
    return re.sub(r"\[([^\]]+)\]\(((?:https?://|#)[^)\s]*)\)", r'<a href="\2">\1</a>', s)


_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:80rem;margin:0.6rem auto;padding:0 1rem;
color:#222;line-height:1.4}
h1{font-size:1.35rem;margin:0.2rem 0 0.4rem} h2{margin-top:2rem;border-bottom:1px solid #ddd}
.scroll{overflow-x:auto;max-width:100%} .scroll td:last-child{min-width:16rem}
table{border-collapse:collapse;margin:0.8rem 0;font-size:0.9rem}
th,td{border:1px solid #ccc;padding:0.25rem 0.5rem;text-align:left;vertical-align:top}
th{background:#f2f2f2} tr:nth-child(even) td{background:#fafafa}
table.box{width:100%;font-size:0.88rem;line-height:1.3;margin:0.4rem 0}
table.box td,table.box th{padding:0.15rem 0.45rem;overflow-wrap:anywhere} table.box td:nth-child(2){white-space:nowrap}
figure{margin:1.2rem 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-style:italic;color:#444} code{background:#f4f4f4;padding:0 0.2rem}
pre{background:#f6f6f6;padding:0.6rem;overflow-x:auto;font-size:0.85rem}
details{margin:0.6rem 0} summary{cursor:pointer;font-weight:600}
.callout{border-left:6px solid #888;padding:0.3rem 0.7rem;margin:0.4rem 0;background:#f6f6f6;font-size:0.92rem}
.callout p{margin:0.1rem 0}
.callout.danger{border-color:#b3261e;background:#fdecea;font-weight:600}
.callout.warn{border-color:#b26a00;background:#fff4e0}
.callout.ok{border-color:#00704a;background:#e8f5ee}
.v-good{color:#00704a;font-weight:700} .v-bad{color:#b3261e;font-weight:700}
.v-none{color:#555;font-weight:700} .v-mixed{color:#7a4d00;font-weight:700}
@media (max-width:760px){body{padding:0 0.4rem} table{font-size:0.8rem} th,td{padding:0.2rem 0.3rem}}
"""
# Verdict words -> colour class (the verdict column of every table is coloured the same way).
VERDICT_CLASS = {"supported": "v-good", "control passed": "v-good", "no difference": "v-good", "passed": "v-good",
                 "contradicted": "v-bad", "control FAILED": "v-bad", "difference": "v-bad", "failed": "v-bad",
                 "inconclusive": "v-none", "degenerate": "v-none", "untested": "v-none", "not checked": "v-none",
                 "control not checked": "v-none", "unproven": "v-none", "mixed": "v-mixed"}
VERDICT_COLUMNS = ("verdict", "status", "entry_verdict")


def to_html(blocks: list[Block], title: str, fig_dir: Path) -> str:
    """One HTML file with every figure embedded as base64 PNG (opens anywhere, no sidecar files)."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
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
            cls = f' class="{b.css}"' if b.css else ""
            table = f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            out.append(f'<div class="scroll">{table}</div>' if b.wide else table)
        elif isinstance(b, Fig):
            data = base64.b64encode((fig_dir / f"{b.stem}.png").read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(_alt(b.caption))}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{_inline(b.caption)}</figcaption></figure>")
        elif isinstance(b, Callout):
            paras = "".join(f"<p>{_inline(line)}</p>" for line in b.text.split("\n"))
            out.append(f'<div class="callout {b.kind}">{paras}</div>')
        elif isinstance(b, Code):
            out.append(f"<details><summary>{_inline(b.summary)}</summary><pre><code>{html.escape(b.text.rstrip())}"
                       "</code></pre></details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _td(col: str, value: str) -> str:
    # "supported · untrusted" is coloured as "supported": the mark beside it says the rest.
    cls = VERDICT_CLASS.get(value.split(" · ")[0]) if col in VERDICT_COLUMNS else None
    return f'<td class="{cls}">{_inline(value)}</td>' if cls else f"<td>{_inline(value)}</td>"
