"""onnxruntime session options every candidate runner opens its sessions with."""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["session_options"]


def session_options(threads: Optional[int]) -> Any:
    """ORT session options with `threads` intra-op threads (None: ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # overridable initializers are intended in sparse graphs
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options
