"""Tables of measurements for notebooks and the command line, as Markdown."""
from __future__ import annotations


def markdown_table(rows: list[dict], columns: dict[str, str], formats: dict[str, str] | None = None) -> str:
    """rows: dicts of values; columns: {key: header}; formats: {key: format spec, e.g. ",.0f" or ".0%"}.

    A header ending in ":" is right-aligned (numbers), e.g. {"ms": "step (ms):"}.
    """
    formats = formats or {}
    heads = [h.rstrip(":") for h in columns.values()]
    align = ["---:" if h.endswith(":") else "---" for h in columns.values()]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        cells = [format(row[k], formats.get(k, "")) for k in columns]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
