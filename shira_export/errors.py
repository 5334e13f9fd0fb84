"""Exceptions with a fixed meaning for callers and for the CLI's exit codes.

The CLI's contract (shira_export/cli.py): 0 success, 1 `ParityFailure`, 2
`ShiraInputError` (and an OS refusal of a path the user named: no space, read-only,
permission, name too long), 130 interrupted, 3 anything else (a bug: printed with its
traceback). Bad input must therefore be raised as `ShiraInputError`, never as a bare
ValueError/TypeError, which the CLI treats as a bug.
"""

from __future__ import annotations

import errno

__all__ = ["ShiraInputError", "ParityFailure", "INPUT_ERRNOS", "is_input_os_error"]


class ShiraInputError(ValueError):
    """Bad input (file, folder, key, module, option): the CLI exits with code 2."""


class ParityFailure(AssertionError):
    """An artifact does not match its PyTorch reference: the CLI exits with code 1."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


# OS refusals of a path the user chose: the environment or the input is wrong, not our code.
INPUT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ENOENT", "EEXIST", "ENOTDIR", "EISDIR", "EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT",
        "ENAMETOOLONG", "EFBIG", "ENOTEMPTY", "ELOOP", "EXDEV",
    ) if hasattr(errno, name)
)


def is_input_os_error(exc: BaseException) -> bool:
    """True for an OSError whose errno says the path or the disk refused (exit 2, not 3)."""
    return isinstance(exc, OSError) and exc.errno in INPUT_ERRNOS
