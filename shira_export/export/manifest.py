"""Moved to the contract package: `shira_export.artifacts.manifest` (re-exported here for
code that imports the sparse manifest from its old place)."""

from shira_export.artifacts.manifest import (
    ADAPTER_DIR,
    MANIFEST_NAME,
    MODEL_NAME,
    SparseManifest,
    adapter_entry,
    load_manifest_json,
    read_sparse_manifest,
)

__all__ = [
    "MANIFEST_NAME",
    "MODEL_NAME",
    "ADAPTER_DIR",
    "SparseManifest",
    "read_sparse_manifest",
    "adapter_entry",
    "load_manifest_json",
]
