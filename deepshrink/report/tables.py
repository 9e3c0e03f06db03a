"""One table definition, two renderings: rich in the terminal, Markdown in files."""

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Any], object]
    fmt: str = "{}"

    def render(self, row: Any) -> str:
        value = self.value(row)
        return "-" if value is None else self.fmt.format(value)


def markdown_table(rows: Sequence[Any], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(c.render(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: Sequence[Any], columns: Sequence[Column], title: str | None = None, console: Console | None = None) -> None:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column.header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(c.render(row) for c in columns))
    # Off a terminal (logs, CI, pipes) rich would wrap at 80 columns; tables read better unwrapped.
    (console or Console(width=None if sys.stdout.isatty() else 200)).print(table)


def _kib(n: int | None) -> float | None:
    return None if n is None else n / 1024


def zoo_columns(manifest: dict[str, dict] | None = None) -> list[Column]:
    """Columns for a list of EvalReports, the zoo table's layout."""
    columns = [
        Column("model", lambda r: r.name),
        Column("Top-1 %", lambda r: r.accuracy.top1, "{:.2f}"),
        Column("Top-5 %", lambda r: r.accuracy.top5, "{:.2f}"),
    ]
    if manifest is not None:
        columns.append(Column("manifest Top-1 %", lambda r: manifest.get(r.name, {}).get("test_top1"), "{:.2f}"))
    return columns + [
        Column("params", lambda r: r.size.params, "{:,}"),
        Column("layers", lambda r: r.size.layers),
        Column("size KiB", lambda r: _kib(r.size.disk_bytes), "{:,.0f}"),
        Column("MMACs", lambda r: r.compute.macs / 1e6, "{:.2f}"),
        Column("MFLOPs", lambda r: r.compute.flops / 1e6, "{:.2f}"),
        Column("torch b1 ms", lambda r: r.latency_ms("torch", 1), "{:.3f}"),
        Column("ORT b1 ms", lambda r: r.latency_ms("onnxruntime", 1), "{:.3f}"),
        Column("torch b64 ms", lambda r: r.latency_ms("torch", 64), "{:.2f}"),
        Column("ORT b64 ms", lambda r: r.latency_ms("onnxruntime", 64), "{:.2f}"),
        Column("ORT max abs diff", lambda r: r.onnx.max_abs_diff if r.onnx else None, "{:.1e}"),
    ]
