"""Small server-side SVG charts (no JavaScript, no library to vendor): a line and a bar chart.

Each returns markup safe to put in a template (``|safe`` is not needed: a ``Markup``); every
chart carries a ``<title>`` and ``aria-label`` and each point a ``<title>`` with its value, and
the page shows the same figures in a table, so nothing depends on seeing the picture.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

WIDTH, HEIGHT, PAD = 640, 200, 32


def _fmt(value: float) -> str:
    return f"{value:,.2f}".rstrip("0").rstrip(".") if isinstance(value, float) else f"{value:,}"


def line_chart(
    points: Sequence[tuple[str, float]],
    *,
    title: str,
    max_value: float | None = None,
    css_class: str = "chart-line",
) -> Markup:
    """A line through (label, value) points, oldest first; labels are shown in the points' titles."""
    if not points:
        return Markup('<p class="chart-empty">No data yet.</p>')
    top = max_value if max_value else max(value for _, value in points) or 1.0
    step = (WIDTH - 2 * PAD) / max(len(points) - 1, 1)

    def xy(index: int, value: float) -> tuple[float, float]:
        return PAD + index * step, HEIGHT - PAD - (HEIGHT - 2 * PAD) * (value / top)

    coordinates = [xy(i, value) for i, (_, value) in enumerate(points)]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
    dots = "".join(
        f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3" data-value="{value}">'
        f"<title>{escape(label)}: {escape(_fmt(value))}</title></circle>"
        for (x, y), (label, value) in zip(coordinates, points, strict=True)
    )
    return Markup(
        f'<svg class="chart {css_class}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"'
        f' aria-label="{escape(title)}" preserveAspectRatio="none" data-points="{len(points)}">'
        f"<title>{escape(title)}</title>"
        f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}"/>'
        f'<line class="axis" x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}"/>'
        f'<text class="tick" x="2" y="{PAD + 4}">{escape(_fmt(top))}</text>'
        f'<text class="tick" x="2" y="{HEIGHT - PAD + 4}">0</text>'
        f'<text class="tick" x="{PAD}" y="{HEIGHT - 8}">{escape(points[0][0])}</text>'
        f'<text class="tick" x="{WIDTH - PAD}" y="{HEIGHT - 8}" text-anchor="end">'
        f"{escape(points[-1][0])}</text>"
        f'<polyline class="series" fill="none" points="{path}"/>{dots}</svg>'
    )


def bar_chart(
    bars: Sequence[tuple[str, float]],
    *,
    title: str,
    max_value: float | None = None,
    classes: Sequence[str] | None = None,
    css_class: str = "chart-bar",
) -> Markup:
    """Horizontal bars, one per (label, value), with the label and value written beside each."""
    if not bars:
        return Markup('<p class="chart-empty">No data yet.</p>')
    top = max_value if max_value else max(value for _, value in bars) or 1.0
    row, label_w = 22, 180
    height = row * len(bars) + 8
    parts = []
    for index, (label, value) in enumerate(bars):
        y = 4 + index * row
        width = (WIDTH - label_w - 80) * (value / top) if top else 0
        extra = f" {escape(classes[index])}" if classes else ""
        parts.append(
            f'<text class="label" x="0" y="{y + 14}">{escape(label)}</text>'
            f'<rect class="bar{extra}" x="{label_w}" y="{y}" width="{max(width, 0):.1f}" height="{row - 6}"'
            f' data-value="{value}"><title>{escape(label)}: {escape(_fmt(value))}</title></rect>'
            f'<text class="value" x="{label_w + max(width, 0) + 6:.1f}" y="{y + 14}">'
            f"{escape(_fmt(value))}</text>"
        )
    return Markup(
        f'<svg class="chart bars {css_class}" viewBox="0 0 {WIDTH} {height}" role="img"'
        f' aria-label="{escape(title)}" data-points="{len(bars)}">'
        f"<title>{escape(title)}</title>{''.join(parts)}</svg>"
    )


def multi_line_chart(
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    css_class: str = "chart-multi",
) -> Markup:
    """One line per named series over the same x ``labels`` (oldest first).  Each line carries the
    class ``sev-<name>`` and is named in words at its end (name and last value) and in a legend, so
    the colour is never the only cue; each point has a ``<title>`` and data attributes."""
    if not labels or not series:
        return Markup('<p class="chart-empty">No data yet.</p>')
    top = max((max(values) for values in series.values()), default=0) or 1
    right = PAD + 110  # room for the line names
    step = (WIDTH - PAD - right) / max(len(labels) - 1, 1)

    def xy(index: int, value: float) -> tuple[float, float]:
        return PAD + index * step, HEIGHT - PAD - (HEIGHT - 2 * PAD) * (value / top)

    # the lines' end labels, moved apart vertically where lines end close together
    ends = sorted((xy(len(values) - 1, values[-1])[1], name) for name, values in series.items())
    label_y: dict[str, float] = {}
    for y, name in ends:
        label_y[name] = max(y + 4, max(label_y.values(), default=-99.0) + 13)
    lines, legend = [], []
    for number, (name, values) in enumerate(series.items()):
        cls = f"sev-{escape(name)}"
        coordinates = [xy(i, value) for i, value in enumerate(values)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
        dots = "".join(
            f'<circle class="point {cls}" cx="{x:.1f}" cy="{y:.1f}" r="3" data-series="{escape(name)}"'
            f' data-day="{escape(label)}" data-value="{value}">'
            f"<title>{escape(label)} · {escape(name.capitalize())}: {escape(_fmt(value))}</title></circle>"
            for (x, y), label, value in zip(coordinates, labels, values, strict=True)
        )
        last_x = coordinates[-1][0]
        lines.append(
            f'<g class="line {cls}" data-series="{escape(name)}">'
            f'<polyline class="series {cls}" fill="none" points="{path}"/>{dots}'
            f'<text class="end" x="{last_x + 8:.1f}" y="{label_y[name]:.1f}">'
            f"{escape(name.capitalize())} {escape(_fmt(values[-1]))}</text></g>"
        )
        legend.append(
            f'<text class="legend {cls}" x="{PAD + number * 110}" y="14">'
            f"— {escape(name.capitalize())}</text>"
        )
    return Markup(
        f'<svg class="chart {css_class}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"'
        f' aria-label="{escape(title)}" preserveAspectRatio="none" data-points="{len(labels)}"'
        f' data-series="{len(series)}">'
        f"<title>{escape(title)}</title>"
        f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - right}" y2="{HEIGHT - PAD}"/>'
        f'<line class="axis" x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}"/>'
        f'<text class="tick" x="2" y="{PAD + 4}">{escape(_fmt(top))}</text>'
        f'<text class="tick" x="2" y="{HEIGHT - PAD + 4}">0</text>'
        f'<text class="tick" x="{PAD}" y="{HEIGHT - 8}">{escape(labels[0])}</text>'
        f'<text class="tick" x="{WIDTH - right}" y="{HEIGHT - 8}" text-anchor="end">'
        f"{escape(labels[-1])}</text>"
        f"{''.join(legend)}{''.join(lines)}</svg>"
    )
