"""Pieces of a self-contained HTML page: escaped text, tables, key-value lists, images inlined
as base64 PNG, figures drawn in memory. The page's Content-Security-Policy allows only inline
styles and ``data:`` images, so a browser that opens it makes no request at all."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

GENERATOR = "diffprobe-report"
# Images larger than this are left out of the page (with a note) to keep reports small.
MAX_IMAGE_BYTES = 4 * 1024 * 1024

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1b1f24;
background:#f6f7f9;font-size:15px;line-height:1.45}
header{background:#1f3b57;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#d6e2ee}
nav{background:#fff;border-bottom:1px solid #d8dde3;padding:8px 24px;
z-index:2;font-size:14px}nav a{margin-right:14px;color:#1f5f99;text-decoration:none}
main{padding:8px 24px 40px;max-width:1400px}
section.stage{background:#fff;border:1px solid #d8dde3;border-radius:6px;margin:18px 0;padding:12px 18px}
section.stage h2 a{font-size:13px;font-weight:normal;margin-left:10px;color:#1f5f99;text-decoration:none}
section.stage h2{margin:4px 0 2px;font-size:19px}section.stage h3{font-size:16px;margin:14px 0 6px}
.where{color:#5b6673;font-size:13px;margin:0 0 8px;word-break:break-all}
figure{display:inline-block;margin:8px 12px 8px 0;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #e3e6ea;image-rendering:auto}
figure img.pixel{image-rendering:pixelated}
figcaption{font-size:13px;color:#39424d;max-width:900px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 10px}
td,th{border:1px solid #d8dde3;padding:3px 8px;text-align:left}th{background:#eef1f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#6b4f00;background:#fff6d8;border:1px solid #efd98a;padding:4px 8px;border-radius:4px;
font-size:13px}
details summary{cursor:pointer;color:#1f5f99}
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A cell: floats to 4 significant digits, the rest as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if any(c in value for c in ".eE") and math.isfinite(number):
            return f"{number:.4g}"
    return str(value)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, limit: int = 20,
          caption: str = "") -> str:  # fmt: skip
    """An HTML table of ``rows`` (first ``limit``; a note says how many were left out)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows[:limit]:
        cells = []
        for c in columns:
            value = row.get(c, "")
            kind = ' class="num"' if _is_number(value) else ""
            cells.append(f"<td{kind}>{esc(fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = (
        f"<p class='where'>{len(rows) - limit} more rows in the file</p>"
        if len(rows) > limit
        else ""
    )
    title = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (
        f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"
    )


def key_values(values: dict, limit: int = 40) -> str:
    """A two-column table of scalar entries (nested dicts flattened with dots)."""
    flat = list(flatten(values))[:limit]
    if not flat:
        return ""
    return table([{"key": k, "value": v} for k, v in flat], ["key", "value"], limit=limit)


def flatten(values: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, name + ".")
        elif isinstance(value, list):
            if value and all(not isinstance(v, (dict, list)) for v in value) and len(value) <= 12:
                yield name, ", ".join(fmt(v) for v in value)
            else:
                yield name, f"[{len(value)} entries]"
        else:
            yield name, value


def png_data(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image(source: str | Path | bytes, caption: str = "", *, pixel: bool = False,
          width: int | None = None) -> str:  # fmt: skip
    """A ``<figure>`` with the PNG inlined (a path or the bytes); a note where it is too large
    or unreadable."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            if path.stat().st_size > MAX_IMAGE_BYTES:
                return f"<p class='note'>{esc(path.name)}: over {MAX_IMAGE_BYTES >> 20} MB, left out</p>"
            data = path.read_bytes()
        except OSError as err:
            return f"<p class='note'>{esc(path.name)}: cannot read ({esc(err)})</p>"
        if not data.startswith(b"\x89PNG"):
            data = _to_png(data)
            if data is None:
                return f"<p class='note'>{esc(path.name)}: not an image</p>"
        caption = caption or path.name
    else:
        data = source
    style = f' style="width:{width}px"' if width else ""
    cls = ' class="pixel"' if pixel else ""
    return (
        f"<figure><img{cls}{style} src='{png_data(data)}' alt='{esc(caption)}'>"
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _to_png(data: bytes) -> bytes | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as picture:
            out = io.BytesIO()
            picture.convert("RGB").save(out, format="PNG")
            return out.getvalue()
    except (UnidentifiedImageError, OSError):
        return None


def figure_png(figure: Any, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (tight bounding box)."""
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=dpi, bbox_inches="tight")
    return out.getvalue()


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document. ``sections``: (anchor id, title, inner HTML)."""
    nav = "".join(f"<a href='#{esc(a)}'>{esc(t)}</a>" for a, t, _ in sections)
    body = "".join(
        f"<section class='stage' id='{esc(a)}'><h2>{esc(t)}<a href='#top'>↑ top</a></h2>{inner}"
        "</section>"
        for a, t, inner in sections
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        f"<meta name='generator' content='{GENERATOR}'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<header id='top'><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )
