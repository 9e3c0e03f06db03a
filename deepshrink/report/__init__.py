"""Human-readable output: tables for the terminal (rich), Markdown, plots and a self-contained HTML report."""

from importlib import import_module

from deepshrink.report.tables import Column, markdown_table, print_table, zoo_columns

# Plots and HTML pull in matplotlib; load them on first use so `deepshrink` commands that
# only print a table do not pay for it.
_LAZY = {
    "render_html_report": "deepshrink.report.html",
    "write_html_report": "deepshrink.report.html",
    "layer_plan_png": "deepshrink.report.plots",
    "pareto_front": "deepshrink.report.plots",
    "pareto_png": "deepshrink.report.plots",
    "stage_png": "deepshrink.report.plots",
    "study_pngs": "deepshrink.report.plots",
}

__all__ = ["Column", "markdown_table", "print_table", "zoo_columns", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepshrink.report' has no attribute {name!r}")
