"""The contract between the stages: what lies on disk. Stages read and write folders through
this package, never through each other's internals.

- `manifest`: `shira_export.json` of every export folder (typed, one reader and writer)
- `tasks`: the task table (exporter task, PEFT task_type, Auto class, outputs compared, inputs)
- `naming`: `shira.<module>.indices/values/weight`, `TargetSite`, the graph fingerprint
- `adapter_io`: `.onnx_adapter` files
- `onnx_io`: the one ONNX writer (external data past 2 GiB)
- `hf_folder`: Hugging Face model folders, loaded so that nothing in them runs code
- `ir_edits`, `onnx_nodes`: graph edits on onnx-ir written back in place, a node builder by
  name (export's site insertion and quantizer, runtime's dense variant)

Nothing is imported here: `import shira_export.artifacts.tasks` stays free of torch and onnx.
"""
