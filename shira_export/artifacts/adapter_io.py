"""`.onnx_adapter` files (onnxruntime's AdapterFormat), as every stage reads and writes them.

Defined in `export.adapter_file` (format, size bounds, the locked install into a folder);
re-exported here so that runtime and verify read adapters through the contract.
"""

from __future__ import annotations

from shira_export.export.adapter_file import (
    ADAPTER_SCHEMA,
    RESERVED_NAMES,
    SUFFIX,
    AdapterArrays,
    adapter_arrays,
    batch_parameters,
    check_adapter_name,
    install_adapter_file,
    max_file_bytes,
    read_adapter_file,
    short_fingerprint,
    write_adapter_file,
)

__all__ = [
    "ADAPTER_SCHEMA",
    "RESERVED_NAMES",
    "SUFFIX",
    "AdapterArrays",
    "adapter_arrays",
    "batch_parameters",
    "check_adapter_name",
    "install_adapter_file",
    "max_file_bytes",
    "read_adapter_file",
    "short_fingerprint",
    "write_adapter_file",
]
