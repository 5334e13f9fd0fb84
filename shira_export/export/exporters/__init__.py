"""The ONNX exporters behind one interface: a model and a task in, `model.onnx` with the
standard names out (see torch_export for the graph contract).

- `torch`: `torch.onnx.export(dynamo=True)`; needs nothing beyond the core install and runs
  on transformers 5.
- `optimum`: optimum-onnx (`pip install "shira-export[optimum]"`, transformers < 4.58).
- `genai`: onnxruntime-genai's model builder (Llama, Mistral, Qwen2/3, Phi-3, Gemma, ...),
  causal LMs only; it loads the folder itself, so it runs in `export.genai_builder`
  rather than behind `export_onnx`.
- `auto`: optimum when it is installed and lists the model type and task, else torch.

Adding an exporter: a module here with `export_with_<name>(model, output_dir, task=, opset=)`,
a member of `Exporter`, and a line in `export_onnx` / `choose_exporter`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from shira_export.errors import ShiraInputError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["Exporter", "choose_exporter", "export_onnx", "DEFAULT_OPSET"]

DEFAULT_OPSET = 18


class Exporter(str, Enum):
    AUTO = "auto"
    TORCH = "torch"
    OPTIMUM = "optimum"
    GENAI = "genai"


def choose_exporter(requested: Union[str, Exporter], config: "PretrainedConfig", task: str) -> Exporter:
    """The concrete exporter for `requested` (auto resolves here), or an input error that says
    why the requested one cannot run."""
    from shira_export.export.exporters.optimum_export import optimum_available, optimum_supports

    try:
        choice = Exporter(requested)
    except ValueError:
        raise ShiraInputError(f"exporter: expected one of {[e.value for e in Exporter]}, found {requested!r}") from None
    model_type = getattr(config, "model_type", None) or "<unknown>"
    if choice is Exporter.AUTO:
        return Exporter.OPTIMUM if optimum_supports(model_type, task) else Exporter.TORCH
    if choice is Exporter.GENAI:
        if task != "text-generation-with-past":
            raise ShiraInputError(
                f"exporter 'genai': onnxruntime-genai's builder writes causal LMs with a KV cache "
                f"(task 'text-generation-with-past'), found task {task!r}"
            )
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            raise ShiraInputError(
                "exporter 'genai': onnxruntime-genai is not installed (pip install \"shira-export[genai]\")"
            ) from None
    if choice is Exporter.OPTIMUM:
        if not optimum_available():
            raise ShiraInputError(
                "exporter 'optimum': optimum-onnx is not installed or cannot import with this "
                'transformers (pip install "shira-export[optimum]" on transformers < 4.58), '
                "or use --exporter torch"
            )
        if not optimum_supports(model_type, task):
            raise ShiraInputError(
                f"model_type {model_type!r}: optimum-onnx cannot export task {task!r} (try --exporter torch)"
            )
    return choice


def export_onnx(
    model: "PreTrainedModel",
    output_dir: Union[str, Path],
    *,
    task: str,
    exporter: Exporter,
    opset: Optional[int] = None,
) -> Path:
    """Write `output_dir/model.onnx` (and config.json, generation_config.json) with `exporter`
    (a concrete one: see `choose_exporter`); returns the graph's path."""
    output_dir = Path(output_dir)
    # config.json names the class exported (save_pretrained does this; exporters do not)
    model.config.architectures = [type(model).__name__]
    if exporter is Exporter.OPTIMUM:
        from shira_export.export.exporters.optimum_export import export_with_optimum

        return export_with_optimum(model, output_dir, task=task, opset=opset)
    if exporter is Exporter.TORCH:
        from shira_export.export.exporters.torch_export import export_with_torch

        path = export_with_torch(model, output_dir, task=task, opset=opset or DEFAULT_OPSET)
        model.config.save_pretrained(output_dir)
        if task.startswith("text-generation") and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(output_dir)
        return path
    raise ShiraInputError(f"exporter {exporter!r}: resolve 'auto' with choose_exporter first")
