"""How a number is printed in every report (JSON messages, Markdown, JUnit)."""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["format_value"]


def format_value(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.3e}"
