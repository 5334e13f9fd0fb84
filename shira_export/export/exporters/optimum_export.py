"""ONNX export through optimum-onnx (`pip install "shira-export[optimum]"`, transformers 4.x).

optimum's graphs are the contract the torch route copies (see torch_export), so folders
from either route are read the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from shira_export._quiet import quiet_loggers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["optimum_available", "optimum_supports", "export_with_optimum"]


def optimum_available() -> bool:
    try:
        import optimum.exporters.onnx  # noqa: F401
    except Exception:  # not installed, or installed beside a transformers it cannot import with
        return False
    return True


def optimum_supports(model_type: str, task: str) -> bool:
    """Whether optimum-onnx's task registry lists `task` for `model_type`."""
    if not optimum_available():
        return False
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills optimum's task registry)
    from optimum.exporters.tasks import TasksManager

    try:
        supported = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        return False
    return task in supported


def export_with_optimum(model: "PreTrainedModel", output_dir: Path, *, task: str, opset: Optional[int]) -> Path:
    """Export with `onnx_export_from_model` into `output_dir`; returns model.onnx."""
    from optimum.exporters.onnx import onnx_export_from_model

    output_dir = Path(output_dir)
    # optimum writes config/generation_config only into a folder it creates itself.
    build = output_dir / "_optimum_build"
    with quiet_loggers("optimum", "transformers", "torch.onnx"):
        onnx_export_from_model(model, build, task=task, opset=opset, do_validation=False, preprocessors=None)
    for item in build.iterdir():
        os.replace(item, output_dir / item.name)
    build.rmdir()
    return output_dir / "model.onnx"
