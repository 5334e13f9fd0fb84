"""What a base model folder is and how to load and export it: task resolution, the
model class per task, the optimum-onnx export call, and copying tokenizer files.

Shared by the merged and the sparse exporters. Every function maps bad input to a
`ShiraInputError` that names the folder, file or option and what was expected.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from shira_export.errors import ShiraInputError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "Task",
    "Dtype",
    "TOKENIZER_FILES",
    "load_base_config",
    "resolve_task",
    "auto_model_class",
    "ort_model_class",
    "load_base_model",
    "export_onnx",
    "convert_onnx_to_fp16",
    "copy_tokenizer_files",
]

PathLike = Union[str, os.PathLike]


class Task(str, Enum):
    """The export tasks this package supports (optimum's names)."""

    AUTO = "auto"
    TEXT_GENERATION_WITH_PAST = "text-generation-with-past"
    TEXT_GENERATION = "text-generation"
    FEATURE_EXTRACTION = "feature-extraction"
    TEXT_CLASSIFICATION = "text-classification"

    @property
    def is_causal_lm(self) -> bool:
        return self in (Task.TEXT_GENERATION_WITH_PAST, Task.TEXT_GENERATION)


class Dtype(str, Enum):
    """Floating-point precision of the exported weights."""

    FP32 = "fp32"
    FP16 = "fp16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32 if self is Dtype.FP32 else torch.float16


# PEFT's task_type (adapter_config.json) -> the task the adapter was trained for.
_PEFT_TASK_TYPES = {
    "CAUSAL_LM": Task.TEXT_GENERATION_WITH_PAST,
    "SEQ_CLS": Task.TEXT_CLASSIFICATION,
    "FEATURE_EXTRACTION": Task.FEATURE_EXTRACTION,
}
# Suffix of config.architectures[0] -> task; first match wins ("Model" = bare backbone).
_ARCH_SUFFIXES = (
    ("ForCausalLM", Task.TEXT_GENERATION_WITH_PAST),
    ("LMHeadModel", Task.TEXT_GENERATION_WITH_PAST),
    ("ForSequenceClassification", Task.TEXT_CLASSIFICATION),
    ("Model", Task.FEATURE_EXTRACTION),
)
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
    """The `config.json` of a local Hugging Face model folder."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not path.is_dir():
        raise ShiraInputError(f"{path}: base model folder not found (expected a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise ShiraInputError(f"{path}: no config.json (expected a Hugging Face model folder)")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ShiraInputError(f"{path / 'config.json'}: not a readable model config ({exc})") from None


def _onnx_tasks(model_type: str) -> list[str]:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills optimum's task registry)
    from optimum.exporters.tasks import TasksManager

    try:
        return list(TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers"))
    except KeyError:
        return []


def resolve_task(
    config: "PretrainedConfig",
    task: Union[str, Task] = Task.AUTO,
    *,
    adapter_task_type: Optional[str] = None,
    onnx: bool = True,
) -> Task:
    """The concrete task for `config`: `task` if given, else the adapter's PEFT task_type,
    else the base's architecture name. With `onnx`, optimum must support it for the model type."""
    try:
        task = Task(task)
    except ValueError:
        raise ShiraInputError(f"task: expected one of {[t.value for t in Task]}, found {task!r}") from None
    model_type = getattr(config, "model_type", None) or "<unknown>"
    if task is Task.AUTO:
        task = _auto_task(config, adapter_task_type)
    if onnx:
        supported = _onnx_tasks(model_type)
        if not supported:
            raise ShiraInputError(f"model_type {model_type!r}: not an architecture optimum-onnx can export")
        if task.value not in supported:
            raise ShiraInputError(
                f"model_type {model_type!r}: task {task.value!r} is not exportable to ONNX; "
                f"optimum-onnx supports {sorted(t for t in supported if t in {x.value for x in Task})}"
            )
    return task


def _auto_task(config: "PretrainedConfig", adapter_task_type: Optional[str]) -> Task:
    if adapter_task_type:
        if adapter_task_type not in _PEFT_TASK_TYPES:
            raise ShiraInputError(
                f"adapter task_type {adapter_task_type!r}: no export task for it; expected one of "
                f"{sorted(_PEFT_TASK_TYPES)}, or pass task explicitly"
            )
        return _PEFT_TASK_TYPES[adapter_task_type]
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures[:1]:
        for suffix, task in _ARCH_SUFFIXES:
            if arch.endswith(suffix):
                return task
    raise ShiraInputError(
        f"config.architectures={architectures!r}: cannot infer the task; pass one of "
        f"{[t.value for t in Task if t is not Task.AUTO]}"
    )


def auto_model_class(task: Task) -> type:
    """The transformers Auto class that loads a model for `task`."""
    import transformers

    names = {
        Task.TEXT_GENERATION_WITH_PAST: "AutoModelForCausalLM",
        Task.TEXT_GENERATION: "AutoModelForCausalLM",
        Task.FEATURE_EXTRACTION: "AutoModel",
        Task.TEXT_CLASSIFICATION: "AutoModelForSequenceClassification",
    }
    return getattr(transformers, names[Task(task)])


def ort_model_class(task: Task) -> type:
    """The optimum.onnxruntime class that runs an ONNX folder exported for `task`."""
    import optimum.onnxruntime as ort

    names = {
        Task.TEXT_GENERATION_WITH_PAST: "ORTModelForCausalLM",
        Task.TEXT_GENERATION: "ORTModelForCausalLM",
        Task.FEATURE_EXTRACTION: "ORTModelForFeatureExtraction",
        Task.TEXT_CLASSIFICATION: "ORTModelForSequenceClassification",
    }
    return getattr(ort, names[Task(task)])


def load_base_model(model_dir: PathLike, task: Task, **kwargs: Any) -> "PreTrainedModel":
    """The base model for `task` in fp32, eval mode; `kwargs` go to `from_pretrained`
    (e.g. num_labels for a fresh classification head)."""
    cls = auto_model_class(task)
    try:
        with warnings.catch_warnings(), _quiet_loggers("transformers"):
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(model_dir, local_files_only=True, **kwargs)  # fp32: the 4.x default
    except (OSError, ValueError, KeyError) as exc:
        raise ShiraInputError(f"{model_dir}: cannot load as {cls.__name__} for task {Task(task).value!r} ({exc})") from None
    return model.eval()


def export_onnx(model: "PreTrainedModel", output_dir: PathLike, *, task: Task, opset: Optional[int] = None) -> list[Path]:
    """Export an in-memory model with optimum-onnx into `output_dir` (may already exist);
    returns the .onnx files written. Models past 2 GB get ONNX external data (optimum's rule)."""
    from optimum.exporters.onnx import onnx_export_from_model

    output_dir = Path(output_dir)
    # config.json should name the class exported (save_pretrained does this; optimum does not).
    model.config.architectures = [type(model).__name__]
    # optimum writes config/generation_config only into a folder it creates itself.
    build = output_dir / "_optimum_build"
    with warnings.catch_warnings(), _quiet_loggers("optimum", "transformers", "torch.onnx"):
        warnings.simplefilter("ignore")
        onnx_export_from_model(
            model, build, task=Task(task).value, opset=opset, do_validation=False, preprocessors=None
        )
    for item in build.iterdir():
        os.replace(item, output_dir / item.name)
    build.rmdir()
    return sorted(output_dir.glob("*.onnx"))


def convert_onnx_to_fp16(path: PathLike) -> Path:
    """Rewrite an fp32 .onnx file in fp16 (weights, activations, inputs and outputs, so the
    KV cache is fp16 too) with onnxruntime's converter, which keeps precision-critical ops
    in fp32. Chosen over exporting a half-precision torch model, which on CPU yields
    mixed-type LayerNormalization nodes for GPT-2."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from shira_export.export.onnx_io import needs_external_data

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
    external = needs_external_data(model)
    onnx.save(model, path, save_as_external_data=external, all_tensors_to_one_file=True,
              location=f"{path.name}_data", size_threshold=1024)
    return path


class _quiet_loggers:
    """Raise the named loggers to ERROR for the duration (exporters log every step at INFO/WARNING)."""

    def __init__(self, *names: str) -> None:
        self._loggers = [logging.getLogger(n) for n in names]
        self._levels: list[int] = []

    def __enter__(self) -> None:
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)


def copy_tokenizer_files(model_dir: PathLike, output_dir: PathLike) -> list[Path]:
    """Copy the base folder's tokenizer files (those present of TOKENIZER_FILES) unchanged."""
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            copied.append(Path(shutil.copy2(src, Path(output_dir) / name)))
    return copied
