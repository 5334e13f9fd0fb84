"""The PyTorch side: base model with one adapter merged, run on the same inputs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from shira_export.artifacts.hf_folder import load_base_model
from shira_export.artifacts.tasks import Family, Task, TaskSpec, spec_for
from shira_export.errors import ShiraInputError
from shira_export.verify.inputs import InputBatch

__all__ = ["TaskFamily", "task_family", "load_base_model", "merged_reference", "TorchRunner"]

TaskFamily = Family  # the task table's families (artifacts.tasks)


def task_family(task: str, *, where: str = "task") -> Family:
    return spec_for(task, where=where).family


def merged_reference(
    base: torch.nn.Module, adapter_dir: Optional[Union[str, Path]], *, model_dir: Optional[Union[str, Path]] = None
) -> torch.nn.Module:
    """A copy of `base` with the adapter at `adapter_dir` merged (or `base` itself for None).

    A classifier adapter may carry a head for another label count than the base config's;
    then the base is reloaded from `model_dir` with that many labels (fresh head, replaced
    by the adapter's)."""
    if adapter_dir is None:
        return base
    from shira_export.tuner import ShiraModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ShiraInputError(f"{adapter_dir}: not an adapter folder (adapter_config.json not found)")
    model = None
    labels = _head_labels(base, adapter_dir)
    if labels is not None and model_dir is not None:
        model = load_base_model(model_dir, Task.TEXT_CLASSIFICATION, num_labels=labels, ignore_mismatched_sizes=True)
    shira = ShiraModel.from_pretrained(model if model is not None else copy.deepcopy(base), adapter_dir)
    return shira.merge_and_unload().eval()


def _head_labels(base: torch.nn.Module, adapter_dir: Path) -> Optional[int]:
    """The adapter's label count when its saved classification head has another than `base`'s."""
    num_labels = getattr(base.config, "num_labels", None)
    if "ForSequenceClassification" not in type(base).__name__ or not isinstance(num_labels, int):
        return None
    from shira_export.tuner.checkpoint import read_adapter_dir

    modules = dict(base.named_modules())
    for path, state in read_adapter_dir(adapter_dir).modules_to_save.items():
        weight = state.get("weight")
        current = getattr(modules.get(path), "weight", None)
        if weight is None or current is None or weight.dim() != 2 or current.dim() != 2:
            continue
        if current.shape[0] == num_labels and weight.shape[0] != num_labels and weight.shape[1] == current.shape[1]:
            return int(weight.shape[0])
    return None


class TorchRunner:
    """Forward passes and greedy generation of a transformers model (reference or candidate),
    for a task of the task table."""

    def __init__(self, model: torch.nn.Module, spec: TaskSpec) -> None:
        self.model = model
        self.spec = spec
        self._dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def forward(self, batch: InputBatch) -> dict[str, np.ndarray]:
        kwargs: dict[str, object] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if self.spec.family is Family.CAUSAL_LM:
            kwargs["use_cache"] = False
            # positions from the mask, as generate() and the ONNX graphs take them: with left
            # padding, models that default to 0..n-1 would otherwise shift every real token
            kwargs["position_ids"] = (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(**kwargs)
        return {name: getattr(out, name).float().numpy() for name in self.spec.outputs}

    @torch.inference_mode()
    def generate(self, batch: InputBatch, n_tokens: int) -> np.ndarray:
        return greedy_generate(self.model, batch, n_tokens)


def greedy_generate(model: Any, batch: InputBatch, n_tokens: int, *, use_cache: bool = True) -> np.ndarray:
    """`n_tokens` greedy tokens per row, KV cache on by default (EOS suppressed so lengths match)."""
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or 0)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    out = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=n_tokens,
        min_new_tokens=n_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=use_cache,
        pad_token_id=pad,
    )
    return np.asarray(out[:, batch.input_ids.shape[1] :])
