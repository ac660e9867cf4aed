"""``compare.html``: the compare table and its figures in one self-contained page.

No scripts, no external files, no fonts fetched: the PNGs are embedded as data URIs with their
pixel sizes as ``width``/``height``, so the page opens anywhere (a browser, an MLflow artifact view)
and shows every figure at its natural size.
"""

from __future__ import annotations

import base64
import html
import struct
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prunetune.tracking.compare import TABLE_NOTE, table_cells

HTML_FILE = "compare.html"
_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; white-space: nowrap; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
img { max-width: none; display: block; }
.note, .source { font-size: 0.85em; color: #555; max-width: 60em; }
"""


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk; a file that is not a PNG is a ValueError."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return struct.unpack(">II", head[16:24])


def _image(path: Path, caption: str) -> str:
    width, height = png_size(path)
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" width="{width}" height="{height}" '
            f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def render_html(table: Mapping[str, Any], figures: Sequence[tuple[Path, str]], *, title: str = "") -> str:
    """The page: title, the table with its note, each search's source, then the figures."""
    header, rows = table_cells(table)
    numeric = set(range(6, len(header)))
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{html.escape(cell)}</td>'
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    sources = "".join(f"<li>{html.escape(row['name'])}: {html.escape(str(row['source']))}</li>"
                      for row in table["searches"])
    title = title or f"prunetune compare: {len(rows)} searches"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
        f'<p class="note">{html.escape(TABLE_NOTE)}.</p>',
        f'<ul class="source">{sources}</ul>',
        *[_image(path, caption) for path, caption in figures],
        f'<p class="source">written {stamp} by <code>prunetune compare</code></p>',
        "</body></html>", ""])


def write_html(table: Mapping[str, Any], figures: Sequence[tuple[Path, str]], out_dir: Path) -> Path:
    """Write ``compare.html`` into ``out_dir``; return its path."""
    path = Path(out_dir) / HTML_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(table, figures), encoding="utf-8")
    return path
