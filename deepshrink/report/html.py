"""One self-contained HTML report: inline CSS, plots as data: URIs, no script, no external URL.

A single file can be mailed, attached to a CI run or opened offline years later and still
show everything; that is why nothing is linked and nothing needs JavaScript.
"""

import base64
import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from deepshrink.core.files import write_atomic
from deepshrink.report.plots import layer_plan_png, stage_png, study_pngs
from deepshrink.report.tables import Column

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; margin: 1em 0; font-size: .92em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: right; white-space: nowrap; } thead th { white-space: normal; }
th { background: #f3f3f3; } td:first-child, th:first-child, .text { text-align: left; }
tr.failed td { color: #a00; } .status { white-space: normal; max-width: 30em; text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; } .missing { color: #777; font-style: italic; }
code { background: #f3f3f3; padding: 0 .2em; }
"""


def _get(key: str):
    return lambda row: row.get(key)


def _mega(key: str):
    # Non-numbers pass through unscaled so _cell can show them as they are.
    return lambda row: row[key] / 1e6 if isinstance(row.get(key), int | float) else row.get(key)


STUDY_COLUMNS = [
    Column("model", _get("model")),
    Column("method", _get("method")),
    Column("Top-1 %", _get("top1"), "{:.2f}"),
    Column("Top-5 %", _get("top5"), "{:.2f}"),
    Column("params", _get("params"), "{:,}"),
    Column("non-zero params", _get("nonzero_params"), "{:,}"),
    Column("bytes", _get("bytes"), "{:,}"),
    Column("compression ratio", _get("compression_ratio"), "{:.1f}×"),
    Column("MMACs dense", _mega("macs"), "{:,.2f}"),
    Column("MMACs effective", _mega("effective_macs"), "{:,.2f}"),
    Column("ORT b1 ms", _get("ort_b1_ms"), "{:.3f}"),
    Column("ORT b64 ms", _get("ort_b64_ms"), "{:.2f}"),
    Column("ORT MB", _get("ort_session_mb"), "{:,.2f}"),
    Column("ORT b64 peak MB", _get("ort_b64_peak_mb"), "{:,.2f}"),
    Column("steps peak MB", _get("steps_peak_mb"), "{:,.0f}"),
    Column("time s", _get("seconds"), "{:,.1f}"),
    Column("status", _get("status")),
]

STAGE_COLUMNS = [
    Column("stage", _get("stage")),
    Column("Top-1 %", _get("top1"), "{:.2f}"),
    Column("Top-5 %", _get("top5"), "{:.2f}"),
    Column("params", _get("params"), "{:,}"),
    Column("non-zero params", _get("nonzero_params"), "{:,}"),
    Column("bytes", _get("bytes"), "{:,}"),
    Column("ratio", _get("ratio"), "{:.1f}×"),
    Column("time s", _get("seconds"), "{:,.1f}"),
]


def write_html_report(path: str | Path, title: str, **sections) -> Path:
    """Write ``render_html_report(title, **sections)`` to ``path`` atomically and return it."""
    path = Path(path)
    write_atomic(path, render_html_report(title, **sections).encode())
    return path


def render_html_report(
    title: str,
    *,
    study_rows: Sequence[Mapping] | None = None,
    stage_rows: Sequence[Mapping] | None = None,
    layer_plans: Mapping[str, Mapping[str, Mapping]] | None = None,
    notes_markdown: str = "",
    environment: Mapping[str, object] | None = None,
) -> str:
    """The report as one HTML string; sections with no data are left out."""
    sections = [
        _study_section(study_rows) if study_rows else "",
        _stage_section(stage_rows) if stage_rows else "",
        _layer_section(layer_plans) if layer_plans else "",
        _section("Notes", _markdown(notes_markdown)) if notes_markdown.strip() else "",
        _section("Environment", _key_value_table(environment)) if environment else "",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n{''.join(sections)}</body>\n</html>\n"
    )


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _section(heading: str, body: str) -> str:
    return f"<section>\n<h2>{_esc(heading)}</h2>\n{body}</section>\n"


def _cell(column: Column, row: Mapping) -> str:
    # A report is written at the end of a long run; a value of an unexpected type is shown as is, not raised.
    try:
        return column.render(row)
    except (TypeError, ValueError, KeyError):
        return str(column.value(row))


def html_table(rows: Sequence[Mapping], columns: Sequence[Column], text_columns: Sequence[str] = ()) -> str:
    """An HTML table; failed study rows (status other than "ok") get the ``failed`` class."""
    head = "".join(f"<th{_cell_class(c, text_columns)}>{_esc(c.header)}</th>" for c in columns)
    # Wrapped so a wide study table scrolls on its own instead of widening the whole page.
    lines = [f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>']
    for row in rows:
        failed = row.get("status") not in (None, "ok")
        cells = "".join(f"<td{_cell_class(c, text_columns)}>{_esc(_cell(c, row))}</td>" for c in columns)
        row_class = ' class="failed"' if failed else ""
        lines.append(f"<tr{row_class}>{cells}</tr>")
    return "\n".join(lines) + "\n</tbody>\n</table></div>\n"


def _cell_class(column: Column, text_columns: Sequence[str]) -> str:
    if column.header == "status":
        return ' class="status"'
    return ' class="text"' if column.header in text_columns else ""


def _figure(png: bytes | None, caption: str) -> str:
    if png is None:
        return f'<p class="missing">{_esc(caption)}: no rows with this measurement.</p>\n'
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure>\n<img alt="{_esc(caption)}" src="data:image/png;base64,{data}">\n<figcaption>{_esc(caption)}</figcaption>\n</figure>\n'
    )


def _study_section(rows: Sequence[Mapping]) -> str:
    pngs = study_pngs(rows)
    captions = {
        "size": "Top-1 against size on disk",
        "latency": "Top-1 against ONNX Runtime latency at batch 64",
        "macs": "Top-1 against MACs (filled: dense, hollow: effective)",
    }
    figures = "".join(_figure(pngs[name], caption) for name, caption in captions.items())
    note = "<p>Only rows with status ok are plotted; lines are each model's Pareto front (best Top-1 for a smaller x).</p>\n"
    return _section("Study", html_table(rows, STUDY_COLUMNS, ("model", "method")) + note + figures)


def _stage_section(rows: Sequence[Mapping]) -> str:
    return _section("Stages", html_table(rows, STAGE_COLUMNS, ("stage",)) + _figure(stage_png(rows), "size and Top-1 after each stage"))


def _layer_section(plans: Mapping[str, Mapping[str, Mapping]]) -> str:
    figures = "".join(_figure(layer_plan_png(plan), f"per-layer plan: {name}") for name, plan in plans.items())
    return _section("Per-layer plans", figures)


def _key_value_table(mapping: Mapping[str, object]) -> str:
    rows = []
    for key, value in mapping.items():
        shown = "-" if value is None else value if isinstance(value, str) else json.dumps(value, default=str)
        rows.append(f'<tr><th>{_esc(key)}</th><td class="text">{_esc(shown)}</td></tr>')
    return "<table>\n" + "\n".join(rows) + "\n</table>\n"


def _inline(text: str) -> str:
    # Escape first, then mark up: `code` and **bold** survive escaping unchanged, so no user text becomes a tag.
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(text))
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


_BULLET = re.compile(r"^\s*[-*] ")


def _markdown(source: str) -> str:
    """A small Markdown subset (headings, bullet lists, paragraphs, `code`, **bold**): notes need no more."""
    out = []
    for block in re.split(r"\n\s*\n", source.strip()):
        lines = block.splitlines()
        if all(_BULLET.match(line) for line in lines):
            items = "".join(f"<li>{_inline(_BULLET.sub('', line))}</li>" for line in lines)
            out.append(f"<ul>{items}</ul>")
        elif len(lines) == 1 and (m := re.match(r"(#{1,4})\s+(.*)", lines[0])):
            level = min(len(m.group(1)) + 2, 6)  # the report's own h1/h2 stay above the notes' headings
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        else:
            out.append(f"<p>{_inline(' '.join(line.strip() for line in lines))}</p>")
    return "\n".join(out) + "\n"
