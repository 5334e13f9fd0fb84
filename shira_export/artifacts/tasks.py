"""The task table: everything the stages know about a task, in one declarative place (in
the spirit of optimum's per-family `OnnxConfig`s).

Per task: the exporter's name for it (optimum's), PEFT's `task_type`, the transformers
Auto class, optimum-onnxruntime's model class for the same folder, the outputs verify
compares and how, the inputs the graph takes, and the heads a classification adapter
saves. Export, verify, the tuner and the CLI read it; nothing here imports torch, so the
CLI builds its choices from it and still answers `--help` at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Mapping, Optional

from shira_export.errors import ShiraInputError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "Task",
    "Family",
    "Compare",
    "TaskSpec",
    "TASKS",
    "spec_for",
    "task_for_peft",
    "task_from_architecture",
    "task_choices",
    "peft_task_types",
    "is_label_head",
    "graph_feeds",
]


class Task(str, Enum):
    """The export tasks this package supports (optimum's names)."""

    AUTO = "auto"
    TEXT_GENERATION_WITH_PAST = "text-generation-with-past"
    TEXT_GENERATION = "text-generation"
    FEATURE_EXTRACTION = "feature-extraction"
    TEXT_CLASSIFICATION = "text-classification"

    @property
    def is_causal_lm(self) -> bool:
        return self is not Task.AUTO and TASKS[self].family is Family.CAUSAL_LM

    @property
    def spec(self) -> "TaskSpec":
        return TASKS[self]


class Family(str, Enum):
    """What kind of model a task runs (the reference and the candidate run it the same way)."""

    CAUSAL_LM = "causal-lm"
    FEATURE_EXTRACTION = "feature-extraction"
    SEQUENCE_CLASSIFICATION = "sequence-classification"


class Compare(str, Enum):
    """How an output is compared beyond its values: what agreement of its last axis'
    argmax means (the values are always compared)."""

    NONE = "none"  # hidden states: no argmax metric
    TOP1 = "top1_agreement"  # LM logits, per position
    LABEL = "label_agreement"  # classifier logits, per row


@dataclass(frozen=True)
class TaskSpec:
    task: Task
    family: Family
    auto_class: str  # transformers class that loads the base for it
    ort_class: str  # optimum.onnxruntime class that loads the exported folder
    outputs: Mapping[str, Compare]  # graph outputs verify compares with PyTorch's, and how
    graph_inputs: tuple[str, ...]  # inputs before the KV cache; those after the first two are optional
    peft_task_type: Optional[str] = None  # adapter_config.json task_type of adapters trained for it
    with_past: bool = False  # the graph takes and returns the KV cache
    pooled: bool = False  # hidden states also judged as mean-pooled sentence embeddings
    arch_suffixes: tuple[str, ...] = ()  # config.architectures[0] suffixes that select it (task "auto")
    head_names: tuple[str, ...] = ()  # heads a PEFT adapter for it saves whole (modules_to_save)
    sparse: bool = True  # `shira-export sparse` offers it


_CAUSAL_INPUTS = ("input_ids", "attention_mask", "position_ids")
_ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # token_type_ids when type_vocab_size > 1

# Order: the CLI lists tasks so; "LMHeadModel" must be matched before the bare "Model".
TASKS: Mapping[Task, TaskSpec] = {
    Task.TEXT_GENERATION_WITH_PAST: TaskSpec(
        Task.TEXT_GENERATION_WITH_PAST,
        Family.CAUSAL_LM,
        "AutoModelForCausalLM",
        "ORTModelForCausalLM",
        {"logits": Compare.TOP1},
        _CAUSAL_INPUTS,
        peft_task_type="CAUSAL_LM",
        with_past=True,
        arch_suffixes=("ForCausalLM", "LMHeadModel"),
    ),
    Task.TEXT_GENERATION: TaskSpec(
        Task.TEXT_GENERATION,
        Family.CAUSAL_LM,
        "AutoModelForCausalLM",
        "ORTModelForCausalLM",
        {"logits": Compare.TOP1},
        _CAUSAL_INPUTS,
        peft_task_type="CAUSAL_LM",
        sparse=False,
    ),
    Task.FEATURE_EXTRACTION: TaskSpec(
        Task.FEATURE_EXTRACTION,
        Family.FEATURE_EXTRACTION,
        "AutoModel",
        "ORTModelForFeatureExtraction",
        {"last_hidden_state": Compare.NONE},
        _ENCODER_INPUTS,
        peft_task_type="FEATURE_EXTRACTION",
        pooled=True,
        arch_suffixes=("Model",),
    ),
    Task.TEXT_CLASSIFICATION: TaskSpec(
        Task.TEXT_CLASSIFICATION,
        Family.SEQUENCE_CLASSIFICATION,
        "AutoModelForSequenceClassification",
        "ORTModelForSequenceClassification",
        {"logits": Compare.LABEL},
        _ENCODER_INPUTS,
        peft_task_type="SEQ_CLS",
        arch_suffixes=("ForSequenceClassification",),
        head_names=("classifier", "score"),
    ),
}
# names older manifests (and optimum's older task names) carry
_ALIASES = {
    "causal-lm": Task.TEXT_GENERATION,
    "causal-lm-with-past": Task.TEXT_GENERATION_WITH_PAST,
    "default": Task.FEATURE_EXTRACTION,
    "sequence-classification": Task.TEXT_CLASSIFICATION,
}


def spec_for(task: object, *, where: str = "task") -> TaskSpec:
    """The table's row for a concrete task name (or an alias a manifest may carry)."""
    known = {t.value: t for t in TASKS} | _ALIASES
    if isinstance(task, Task) and task in TASKS:
        return TASKS[task]
    if isinstance(task, str) and task in known:
        return TASKS[known[task]]
    raise ShiraInputError(f"{where}: expected one of {sorted(known)}, found {task!r}")


def task_for_peft(task_type: str) -> Optional[Task]:
    """The default export task for adapters of PEFT `task_type` (first row that names it)."""
    return next((s.task for s in TASKS.values() if s.peft_task_type == task_type), None)


def peft_task_types() -> list[str]:
    return sorted({s.peft_task_type for s in TASKS.values() if s.peft_task_type})


def task_from_architecture(architecture: str) -> Optional[Task]:
    for spec in TASKS.values():
        if spec.arch_suffixes and architecture.endswith(spec.arch_suffixes):
            return spec.task
    return None


def task_choices(*, sparse: bool = False) -> tuple[str, ...]:
    """The CLI's `--task` choices: "auto" and every task (that a sparse export offers)."""
    return (Task.AUTO.value,) + tuple(t.value for t, s in TASKS.items() if s.sparse or not sparse)


def is_label_head(path: str, task: Task = Task.TEXT_CLASSIFICATION) -> bool:
    """Whether module `path` is a saved classification head whose weight rows are the labels:
    a head of the table, or the `out_proj` inside one (RoBERTa's classifier)."""
    parts = path.split(".")
    heads = TASKS[task].head_names
    return parts[-1] in heads or (len(parts) > 1 and parts[-1] == "out_proj" and parts[-2] in heads)


def graph_feeds(
    spec: TaskSpec,
    input_ids: "np.ndarray",
    attention_mask: "np.ndarray",
    names: "list[str] | tuple[str, ...] | set[str]",
) -> dict[str, "np.ndarray"]:
    """Feeds for a graph of `spec` that takes `names`: the ids and mask, plus each optional
    input the graph has (token_type_ids zeros, position_ids counted from the mask)."""
    import numpy as np

    values = {"input_ids": input_ids, "attention_mask": attention_mask}
    for name in spec.graph_inputs[2:]:
        if name not in names:
            continue
        if name == "token_type_ids":
            values[name] = np.zeros_like(input_ids)
        elif name == "position_ids":
            values[name] = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
    return {k: v for k, v in values.items() if k in names}
