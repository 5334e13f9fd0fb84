"""What a base model folder is and how to load it for export: task resolution, the model
class per task (both from the task table, `artifacts.tasks`), and copying tokenizer files
(the ONNX exporters are in `exporters/`).

Shared by the merged and the sparse exporters. Every function maps bad input to a
`ShiraInputError` that names the folder, file or option and what was expected.
"""

from __future__ import annotations

import os
import shutil
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

from shira_export.artifacts.hf_folder import load_base_model
from shira_export.artifacts.tasks import Task, peft_task_types, spec_for, task_for_peft, task_from_architecture
from shira_export.errors import ShiraInputError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "Task",
    "Dtype",
    "TOKENIZER_FILES",
    "load_base_config",
    "resolve_task",
    "auto_model_class",
    "load_base_model",
    "convert_onnx_to_fp16",
    "copy_tokenizer_files",
]

PathLike = Union[str, os.PathLike]


class Dtype(str, Enum):
    """Floating-point precision of the exported weights."""

    FP32 = "fp32"
    FP16 = "fp16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32 if self is Dtype.FP32 else torch.float16


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def load_base_config(model_dir: PathLike) -> "PretrainedConfig":
    """The `config.json` of a local Hugging Face model folder (refused if a field selects code)."""
    from shira_export.artifacts.hf_folder import load_config

    return load_config(model_dir)


def resolve_task(
    config: "PretrainedConfig",
    task: Union[str, Task] = Task.AUTO,
    *,
    adapter_task_type: Optional[str] = None,
) -> Task:
    """The concrete task for `config`: `task` if given, else the adapter's PEFT task_type,
    else the base's architecture name. Whether an exporter can write it is the exporter's
    question (`exporters.choose_exporter`)."""
    try:
        task = Task(task)
    except ValueError:
        raise ShiraInputError(f"task: expected one of {[t.value for t in Task]}, found {task!r}") from None
    if task is Task.AUTO:
        task = _auto_task(config, adapter_task_type)
    _check_task_fits(config, task, adapter_task_type)
    return task


def _check_task_fits(config: "PretrainedConfig", task: Task, adapter_task_type: Optional[str]) -> None:
    """A causal task needs a causal-LM base, classification a base that is not one, and an
    adapter trained for one kind of task cannot serve the other."""
    trained_for = task_for_peft(adapter_task_type) if adapter_task_type else None
    if trained_for is not None and trained_for.is_causal_lm != task.is_causal_lm:
        raise ShiraInputError(
            f"adapter task_type {adapter_task_type!r} does not fit task {task.value!r} "
            f"(expected task {trained_for.value!r})"
        )
    architectures = list(getattr(config, "architectures", None) or [])[:1]
    causal_base = any(task_from_architecture(a) is Task.TEXT_GENERATION_WITH_PAST for a in architectures)
    if task.is_causal_lm and architectures and not causal_base:
        raise ShiraInputError(
            f"config.architectures={architectures!r}: task {task.value!r} needs a causal LM base "
            f"(*ForCausalLM / *LMHeadModel)"
        )
    if task is Task.TEXT_CLASSIFICATION and causal_base:
        raise ShiraInputError(
            f"config.architectures={architectures!r}: task 'text-classification' needs an encoder "
            f"or a *ForSequenceClassification base, found a causal LM"
        )


def _auto_task(config: "PretrainedConfig", adapter_task_type: Optional[str]) -> Task:
    if adapter_task_type:
        trained_for = task_for_peft(adapter_task_type)
        if trained_for is None:
            raise ShiraInputError(
                f"adapter task_type {adapter_task_type!r}: no export task for it; expected one of "
                f"{peft_task_types()}, or pass task explicitly"
            )
        return trained_for
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures[:1]:
        found = task_from_architecture(arch)
        if found is not None:
            return found
    raise ShiraInputError(
        f"config.architectures={architectures!r}: cannot infer the task; pass one of "
        f"{[t.value for t in Task if t is not Task.AUTO]}"
    )


def auto_model_class(task: Task) -> type:
    """The transformers Auto class that loads a model for `task` (the task table's)."""
    import transformers

    return getattr(transformers, spec_for(task).auto_class)


def convert_onnx_to_fp16(path: PathLike) -> Path:
    """Rewrite an fp32 .onnx file in fp16 (weights, activations, inputs and outputs, so the
    KV cache is fp16 too) with onnxruntime's converter, which keeps precision-critical ops
    in fp32. Chosen over exporting a half-precision torch model, which on CPU yields
    mixed-type LayerNormalization nodes for GPT-2."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from shira_export.artifacts.onnx_io import save_onnx

    path = Path(path)
    model = onnx.load(path, load_external_data=True)
    old_data = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    model = convert_float_to_float16(model, keep_io_types=False)
    for name in old_data:
        (path.parent / name).unlink(missing_ok=True)
    save_onnx(model, path)
    return path


def copy_tokenizer_files(model_dir: PathLike, output_dir: PathLike) -> list[Path]:
    """Copy the base folder's tokenizer files (those present of TOKENIZER_FILES) unchanged."""
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            copied.append(Path(shutil.copy2(src, Path(output_dir) / name)))
    return copied
