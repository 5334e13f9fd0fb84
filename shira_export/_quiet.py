"""Exporters log every step at INFO/WARNING; a user's terminal shows only errors."""

from __future__ import annotations

import logging
import warnings
from typing import Any

__all__ = ["quiet_loggers"]


class quiet_loggers:
    """Raise the named loggers to ERROR and ignore warnings for the duration."""

    def __init__(self, *names: str) -> None:
        self._loggers = [logging.getLogger(n) for n in names]
        self._levels: list[int] = []
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> None:
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.ERROR)
        self._warnings.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: Any) -> None:
        self._warnings.__exit__(*exc)
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)
