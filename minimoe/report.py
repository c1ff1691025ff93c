"""Tables of measurements for notebooks and the command line, as Markdown."""
from __future__ import annotations


def markdown_table(rows: list[dict], columns: dict[str, str], formats: dict[str, str] | None = None) -> str:
    """rows: dicts of values; columns: {key: header}; formats: {key: format spec, e.g. ",.0f" or ".0%"}.

    A header ending in ":" is right-aligned (numbers), e.g. {"ms": "step (ms):"}. None is shown as "–" (not
    measured, or undefined), whatever the format.
    """
    formats = formats or {}
    heads = [h.rstrip(":") for h in columns.values()]
    align = ["---:" if h.endswith(":") else "---" for h in columns.values()]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        cells = ["–" if row[k] is None else format(row[k], formats.get(k, "")) for k in columns]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def compare_seeds(a, b, names: tuple[str, str] = ("a", "b")) -> dict:
    """Compare two groups of per-seed results (e.g. final validation losses) the way the book reports them.

    The difference of the means counts only when it is larger than the seed-to-seed spread of both groups,
    measured as each group's range (max - min); otherwise the verdict is "tie". Needs >= 3 seeds a group.
    Returns the means, standard deviations, ranges, the difference (mean a - mean b) and "verdict": one of
    "tie", "<name a> lower", "<name b> lower".
    """
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) < 3 or len(b) < 3:
        raise ValueError(f"compare at least three seeds per group, got {len(a)} and {len(b)}")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    spread = max(max(a) - min(a), max(b) - min(b))
    diff = ma - mb
    verdict = "tie" if abs(diff) <= spread else f"{names[0] if diff < 0 else names[1]} lower"
    return {"mean_a": ma, "std_a": sa, "mean_b": mb, "std_b": sb, "diff": diff, "spread": spread,
            "verdict": verdict}
