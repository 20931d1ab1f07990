"""Plain-text tables for the command line."""

from __future__ import annotations


def print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    """Columns padded to their widest cell; the last column is free text."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(f"{str(v):<{w}}" for v, w in zip(row, widths)) + "  " + str(row[-1]))
