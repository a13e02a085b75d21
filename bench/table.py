"""The bench's one table format: measured value, target, same-run baseline or context, and whether it is met."""


def print_table(rows: list[tuple]) -> None:
    headers = ("measure", "value", "target", "baseline / context", "ok")
    cells = [(name, f"{value:.3f}{'' if unit in ('x', '') else ' '}{unit}" if isinstance(value, float) else str(value), target, context, "yes" if ok else "NO")
             for name, value, target, context, ok, unit in rows]
    widths = [max(len(str(row[i])) for row in [headers, *cells]) for i in range(len(headers))]
    line = lambda row: "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + " |"  # noqa: E731
    print(line(headers))
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in cells:
        print(line(row))
