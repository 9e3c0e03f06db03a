"""Human-readable output: tables for the terminal (rich) and Markdown."""

from deepshrink.report.tables import Column, markdown_table, print_table, zoo_columns

__all__ = ["Column", "markdown_table", "print_table", "zoo_columns"]
