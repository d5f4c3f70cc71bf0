"""Inline SVG charts for the offline HTML reports: one palette, scales, axes, ticks, lines, points,
labels and legends. Every report draws its charts with these, so they look alike and every text
that reaches the page is escaped here. No JS, nothing fetched at view time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f5fa8", "#e15759", "#59a14f", "#f28e2b", "#76b7b2", "#b07aa1", "#9c755f", "#edc948", "#ff9da7", "#bab0ac")
BLUE, RED, GREEN, ORANGE, TEAL, PURPLE, BROWN, YELLOW, PINK, SAND = PALETTE
GREY, LIGHT, INK = "#8a8a8a", "#bbbbbb", "#555555"  # random / filtered-out / neutral series
AXIS, RULE, FAINT = "#999999", "#cccccc", "#eeeeee"  # axes, reference lines, the faintest rule

# Shared by every report's <style>: the chart frame and the colour key under a set of charts.
CSS = """svg.chart{background:#fafafa;border:1px solid #eee}svg.chart text{font-family:system-ui,sans-serif}
.key span{display:inline-block;margin-right:.8rem;font-size:12px}.key i{display:inline-block;width:10px;height:10px;margin-right:3px}"""


def color(i: int) -> str:
    """The i-th colour of the palette, cycling."""
    return PALETTE[i % len(PALETTE)]


def finite(*vs) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vs)


@dataclass(frozen=True)
class Scale:
    """A data value -> a pixel along one axis. `lo`..`hi` is the domain (its logs when `log`; the
    category list when `cats`), mapped onto the pixels `a`..`b` (`b` < `a` on a y axis)."""

    lo: float
    hi: float
    a: float
    b: float
    log: bool = False
    cats: tuple = ()

    def __call__(self, v) -> float:
        if self.cats:
            t = self.cats.index(v) / max(len(self.cats) - 1, 1)
        else:
            t = ((math.log(v) if self.log else v) - self.lo) / ((self.hi - self.lo) or 1)  # a flat domain: all at `a`
        return self.a + t * (self.b - self.a)


def linear(lo: float, hi: float, a: float, b: float) -> Scale:
    return Scale(lo, hi, a, b)


def log(lo: float, hi: float, a: float, b: float) -> Scale:
    """Log axis over the positive data values lo..hi."""
    return Scale(math.log(lo), math.log(hi), a, b, log=True)


def categories(values, a: float, b: float) -> Scale:
    """Evenly spaced points for values that are not numbers (the first at `a`, the last at `b`)."""
    return Scale(0, 1, a, b, cats=tuple(values))


def _n(v: float) -> str:
    return f"{v:.1f}"


def _attrs(**kw) -> str:
    """SVG attributes; `_` in a name becomes `-` (stroke_width), a trailing `_` is dropped (class_)."""
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{escape(str(v))}"' for k, v in kw.items() if v is not None)


class Chart:
    """One <svg> of `w` x `h` pixels with an x and a y scale. Methods taking data values map them
    through the scales; `text` and `rule` take pixels. `svg()` returns the markup."""

    def __init__(self, w: int, h: int, x: Scale, y: Scale, **attrs):
        self.w, self.h, self.x, self.y, self.attrs = w, h, x, y, attrs
        self.parts: list[str] = []

    # pixels
    def rule(self, x1: float, y1: float, x2: float, y2: float, stroke: str = AXIS, dash: str | None = None) -> Chart:
        self.parts.append(
            f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}"{_attrs(stroke=stroke, stroke_dasharray=dash)}/>'
        )
        return self

    def text(
        self,
        x: float,
        y: float,
        s,
        size: int = 10,
        anchor: str | None = None,
        fill: str | None = None,
        rotate: bool = False,
    ) -> Chart:
        turn = f"rotate(-90 {_n(x)} {_n(y)})" if rotate else None
        self.parts.append(
            f'<text x="{_n(x)}" y="{_n(y)}"{_attrs(font_size=size, text_anchor=anchor, fill=fill, transform=turn)}>'
            f"{escape(str(s))}</text>"
        )
        return self

    # data values
    def axes(self, stroke: str = AXIS, left: bool = True) -> Chart:
        """The x axis along the bottom of the y range, and (`left`) the y axis at the start of the x range."""
        self.rule(self.x.a, self.y.a, self.x.b, self.y.a, stroke)
        return self.rule(self.x.a, self.y.b, self.x.a, self.y.a, stroke) if left else self

    def hline(self, v: float, stroke: str = RULE, dash: str | None = None) -> Chart:
        return self.rule(self.x.a, self.y(v), self.x.b, self.y(v), stroke, dash)

    def vline(self, v: float, stroke: str = RULE, dash: str | None = None, top: float | None = None) -> Chart:
        return self.rule(self.x(v), self.y.b if top is None else top, self.x(v), self.y.a, stroke, dash)

    def xticks(self, values, fmt=str, dy: float = 14, anchor: str | None = "middle", size: int = 10) -> Chart:
        """A label under the x axis at each value; `dy` pixels below the axis."""
        for v in values:
            self.text(self.x(v), self.y.a + dy, fmt(v), size, anchor)
        return self

    def yticks(self, values, fmt=str, x: float | None = None, anchor: str | None = "end", size: int = 10) -> Chart:
        """A label at each y value, right-aligned left of the y axis (or from pixel `x`)."""
        for v in values:
            self.text(self.x.a - 4 if x is None else x, self.y(v) + 4, fmt(v), size, anchor)
        return self

    def xlabel(self, s, size: int = 11, below: float = 6) -> Chart:
        """The x axis' name, centred, its baseline `below` pixels above the bottom edge."""
        return self.text(self.w / 2, self.h - below, s, size, "middle")

    def ylabel(self, s, size: int = 11, x: float = 10) -> Chart:
        return self.text(x, self.h / 2, s, size, "middle", rotate=True)

    def line(self, pts, stroke: str, width: float = 2) -> Chart:
        """A polyline through the (x, y) data points, in the order given."""
        xy = " ".join(f"{_n(self.x(a))},{_n(self.y(b))}" for a, b in pts)
        self.parts.append(f'<polyline points="{xy}" fill="none"{_attrs(stroke=stroke, stroke_width=width)}/>')
        return self

    def dot(
        self,
        x,
        y,
        fill: str | None,
        r: float = 3,
        title=None,
        stroke: str | None = None,
        stroke_width: float | None = None,
        opacity: float | None = None,
    ) -> Chart:
        """A circle at a data point; `title` is its hover text."""
        a = _attrs(r=r, fill=fill or "none", stroke=stroke, stroke_width=stroke_width, opacity=opacity)
        tip = "/>" if title is None else f"><title>{escape(str(title))}</title></circle>"
        self.parts.append(f'<circle cx="{_n(self.x(x))}" cy="{_n(self.y(y))}"{a}{tip}')
        return self

    def dots(self, pts, fill: str, r: float = 3, titles=None) -> Chart:
        for i, (a, b) in enumerate(pts):
            self.dot(a, b, fill, r, None if titles is None else titles[i])
        return self

    def square(self, x, y, fill: str, size: float = 8, opacity: float | None = None) -> Chart:
        px, py = self.x(x) - size / 2, self.y(y) - size / 2
        self.parts.append(
            f'<rect x="{_n(px)}" y="{_n(py)}"{_attrs(width=size, height=size, fill=fill, opacity=opacity)}/>'
        )
        return self

    def triangle(self, x, y, stroke: str = "#000") -> Chart:
        """A hollow triangle pointing up, centred a little above the point."""
        self.parts.append(
            f'<path d="M{_n(self.x(x))},{_n(self.y(y) - 6)} l6,10 l-12,0 z" fill="none"{_attrs(stroke=stroke)}/>'
        )
        return self

    def svg(self) -> str:
        # No xmlns: inline SVG in HTML needs none, and a report holds no URL at all (tests check it).
        attrs = {**self.attrs, "class_": ("chart " + self.attrs.get("class_", "")).strip()}
        return (
            f'<svg width="{self.w}" height="{self.h}" viewBox="0 0 {self.w} {self.h}"'
            f"{_attrs(**attrs)}>{''.join(self.parts)}</svg>"
        )


def key(items) -> str:
    """A colour key: (name, colour) pairs as swatches, for the charts under it."""
    return (
        '<div class="key">'
        + "".join(f'<span><i style="background:{escape(c)}"></i>{escape(str(n))}</span>' for n, c in items)
        + "</div>"
    )


def coloured(s, c: str) -> str:
    """Caption text in a series' colour (the caption then names the series)."""
    return f'<span style="color:{escape(c)}">{escape(str(s))}</span>'


def no_data(w: int = 300) -> str:
    return Chart(w, 60, linear(0, 1, 0, w), linear(0, 1, 60, 0)).text(10, 30, "no data", 12).svg()


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    colors: dict[str, str],
    w: int = 300,
    h: int = 210,
    diag: bool = False,
    vline: float | None = None,
    ylim: tuple[float, float] | None = None,
) -> str:
    """Labelled axes with the ends of each range, one line per series (points marked when a series
    has 8 or fewer, with their values on hover); `diag` the y = x chance line, `vline` a dashed
    reference x. Points that are not finite numbers are left out; a series' colour comes from
    `colors` (ink when absent)."""
    series = {k: [p for p in s if finite(*p)] for k, s in series.items()}
    pts = [p for s in series.values() for p in s]
    if not pts:
        return no_data()
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = ylim or (min(p[1] for p in pts), max(p[1] for p in pts))
    if vline is not None:
        x0, x1 = min(x0, vline), max(x1, vline)
    x0, x1 = (x0 - 0.5, x1 + 0.5) if x1 == x0 else (x0, x1)
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 == y0 else (y0, y1)
    L, R, T, B = 40, 10, 10, 34
    c = Chart(w, h, linear(x0, x1, L, w - R), linear(y0, y1, h - B, T)).axes()
    c.xlabel(xlabel).ylabel(ylabel)
    c.text(L, h - B + 12, f"{x0:.2g}").text(w - R, h - B + 12, f"{x1:.2g}", anchor="end")
    c.text(L - 3, h - B, f"{y0:.2g}", anchor="end").text(L - 3, T + 8, f"{y1:.2g}", anchor="end")
    if diag:
        c.rule(c.x(0), c.y(0), c.x(1), c.y(1), RULE, "3 3")
    if vline is not None:
        c.vline(vline, LIGHT, "4 3")
    for name, s in series.items():
        col = colors.get(name, INK)
        if len(s) > 1:
            c.line(s, col)
        if len(s) <= 8:
            c.dots(s, col, titles=[f"{name}: {x:.3g}, {y:.3g}" for x, y in s])
    return c.svg()
