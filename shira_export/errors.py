"""Exceptions with a fixed meaning for callers and for the CLI's exit codes.

The CLI's contract (shira_export/cli.py): 0 success, 1 `ParityFailure`, 2
`ShiraInputError` (and an OS refusal of a path the user named: no space, read-only,
permission, name too long), 130 interrupted, 3 anything else (a bug: printed with its
traceback). Bad input must therefore be raised as `ShiraInputError`, never as a bare
ValueError/TypeError, which the CLI treats as a bug.
"""

from __future__ import annotations

import errno

__all__ = [
    "ShiraInputError",
    "ParityFailure",
    "INPUT_ERRNOS",
    "is_input_os_error",
    "check_opset",
    "CandidateError",
    "candidate_errors",
]


class ShiraInputError(ValueError):
    """Bad input (file, folder, key, module, option): the CLI exits with code 2."""


class ParityFailure(AssertionError):
    """An artifact does not match its PyTorch reference: the CLI exits with code 1."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class CandidateError(RuntimeError):
    """An artifact under verification cannot run an input (or cannot be opened): the
    verifier records it as a failed check, i.e. a parity failure, not a bug."""


def candidate_errors() -> tuple[type[BaseException], ...]:
    """What a candidate's runtime raises for a model that does not load or run: onnxruntime's
    own exception classes (which are not RuntimeErrors), onnx's protobuf decode error and
    CandidateError. Anything else a verifier meets is a bug and propagates (exit 3)."""
    found: list[type[BaseException]] = [CandidateError]
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        found += [c for c in vars(ort_state).values() if isinstance(c, type) and issubclass(c, Exception)]
    except ImportError:
        pass
    try:
        from google.protobuf.message import DecodeError

        found.append(DecodeError)
    except ImportError:
        pass
    return tuple(found)


# OS refusals of a path the user chose: the environment or the input is wrong, not our code.
INPUT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOENT",
        "EEXIST",
        "ENOTDIR",
        "EISDIR",
        "EACCES",
        "EPERM",
        "EROFS",
        "ENOSPC",
        "EDQUOT",
        "ENAMETOOLONG",
        "EFBIG",
        "ENOTEMPTY",
        "ELOOP",
        "EXDEV",
    )
    if hasattr(errno, name)
)


def check_opset(opset: object, minimum: int, *, why: str = "") -> None:
    """An ONNX opset option: an integer from `minimum` to the newest the installed onnx
    knows (None = the exporter's default)."""
    if opset is None:
        return
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not minimum <= opset <= newest:
        raise ShiraInputError(
            f"opset: expected an integer from {minimum}{why} to {newest} (the newest the "
            f"installed onnx {onnx.__version__} knows), found {opset!r}"
        )


def is_input_os_error(exc: BaseException) -> bool:
    """True for an OSError whose errno says the path or the disk refused (exit 2, not 3)."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno is None:  # raised by Python code with a message only: the class says what it is
        return isinstance(
            exc, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
        )
    return exc.errno in INPUT_ERRNOS
