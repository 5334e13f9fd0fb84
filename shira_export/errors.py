"""Exceptions with a fixed meaning for callers and for the CLI's exit codes."""

from __future__ import annotations


class ShiraInputError(ValueError):
    """Bad input (file, folder, key, module, option): the CLI exits with code 2."""


class ParityFailure(AssertionError):
    """An artifact does not match its PyTorch reference: the CLI exits with code 1."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report
