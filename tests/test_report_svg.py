"""The shared chart module of the HTML reports (steerscope/report/svg.py)."""

import math
import re

from steerscope.report import svg


def test_scales_map_the_ends_and_the_middle():
    x = svg.log(1, 100, 10, 110)
    assert (x(1), x(10), x(100)) == (10, 60, 110)  # log: 10 is halfway between 1 and 100
    y = svg.linear(0, 1, 200, 0)  # a y axis runs upwards
    assert (y(0), y(0.25), y(1)) == (200, 150, 0)
    c = svg.categories(["dct", "kl", "melbo"], 0, 100)
    assert [c(v) for v in ("dct", "kl", "melbo")] == [0, 50, 100]
    assert svg.linear(3, 3, 5, 9)(3) == 5  # a flat domain does not divide by zero


def test_every_text_is_escaped_and_points_are_finite():
    nasty = '<b>"x" & y</b>'
    out = svg.line_chart(
        {nasty: [(0, 0), (1, float("nan")), (2, 1)]}, nasty, nasty, {nasty: svg.RED}, vline=1.5, diag=True
    )
    assert "<b>" not in out and out.count("&lt;b&gt;") == 4  # x label, y label, two point titles
    assert out.count("<circle") == 2 and "nan" not in out  # the NaN point is left out
    assert svg.key([(nasty, svg.BLUE)]).count("&lt;b&gt;") == 1 and "<b>" not in svg.coloured(nasty, svg.RED)
    nums = [float(v) for v in re.findall(r'(?:x|y|cx|cy)\d?="(-?[\d.]+)"', out)]
    assert nums and all(math.isfinite(v) and 0 <= v <= 300 for v in nums)
    assert "no data" in svg.line_chart({"a": [(float("inf"), 1)]}, "x", "y", {})
