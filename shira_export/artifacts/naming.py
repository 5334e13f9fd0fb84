"""How an adapter binds to a sparse graph: the tensor names, the sites, the fingerprint.

Per targeted module `m` (its PyTorch path):

    shira.<m>.indices       int32 [R, 1, nnz]      graph input + .onnx_adapter parameter (flat out * in_features + in)
    shira.<m>.values        fp32  [R, 1, nnz]      graph input + .onnx_adapter parameter
    shira.<m>.ell_indices   int32 [R, 1, K * out]  graph input + .onnx_adapter parameter (input feature of slot k
    shira.<m>.ell_values    fp32  [R, 1, K * out]  of output j at k * out + j, and its value; export.site_layout)
    shira.<m>.weight                  the runtime's dense variant: the merged weight fed per call

`TargetSite` says where `m` lives in the graph (node, initializer, layout); a sparse
manifest lists one per module. `graph_fingerprint` hashes the sites' weights: it is the
sparse manifest's `base_fingerprint` and every `.onnx_adapter`'s model_version.

The graph surgery that writes this layout lives in `export.graph_delta` (and
`export.genai_sites` for genai builder graphs); the names are defined there and re-exported
here, so that runtime and verify depend on the contract, not on the surgery.
"""

from __future__ import annotations

from shira_export.export.graph_delta import (
    DEFAULT_TOKEN_THRESHOLD,
    PREFIX,
    TargetSite,
    adapter_input_names,
    check_graph_contract,
    ell_indices_name,
    ell_values_name,
    graph_fingerprint,
    indices_name,
    site_base_node,
    values_name,
    weight_name,
)

# metadata_props key of a genai builder graph: how its packed q|k|v sites map to modules
GENAI_GROUPS_KEY = "shira.genai_groups"

__all__ = [
    "GENAI_GROUPS_KEY",
    "PREFIX",
    "DEFAULT_TOKEN_THRESHOLD",
    "TargetSite",
    "indices_name",
    "values_name",
    "ell_indices_name",
    "ell_values_name",
    "adapter_input_names",
    "check_graph_contract",
    "weight_name",
    "graph_fingerprint",
    "site_base_node",
]
