"""Hugging Face model folders, loaded so that nothing in them can run code.

A model folder from elsewhere is data, not code: `from_pretrained` is always called with
`trust_remote_code=False`, `use_safetensors=True` and `local_files_only=True`, and before
that the config is read here and refused when a field selects code (transformers would
otherwise fetch or import it: `auto_map`, a hub kernel in `_attn_implementation_internal`,
a config that re-enables `trust_remote_code`; CVE-2026-4372 and CVE-2026-5241). A folder
whose weights exist only as pickles (`pytorch_model.bin`, `*.pt`) is refused: unpickling
runs code.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Union

from shira_export.errors import ShiraInputError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "check_config_dict",
    "check_folder",
    "read_config_json",
    "load_config",
    "load_model",
    "load_base_model",
    "find_tokenizer",
    "TOKENIZER_MARKERS",
    "SAFE_LOAD_KWARGS",
]

PathLike = Union[str, os.PathLike]
SAFE_LOAD_KWARGS = {"trust_remote_code": False, "use_safetensors": True, "local_files_only": True}
# attention back-ends built into transformers; any other value names a kernel to fetch
_BUILTIN_ATTENTION = {
    None,
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flex_attention",
    "paged_attention",
    "sdpa_paged",
    "eager_paged",
}
_ATTENTION_FIELDS = ("_attn_implementation_internal", "_attn_implementation", "attn_implementation")
_CODE_FIELDS = ("auto_map", "trust_remote_code", "custom_pipelines")
_MAX_DEPTH = 32
_MAX_CONFIG_BYTES = 16 * 2**20
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")  # a folder has a tokenizer


def check_config_dict(raw: Any, where: str, *, depth: int = 0) -> None:
    """Refuse fields that make transformers run code, anywhere in the config (sub-configs of
    multimodal models included)."""
    if depth > _MAX_DEPTH:
        raise ShiraInputError(f"{where}: nested deeper than {_MAX_DEPTH} levels (expected a model config)")
    if isinstance(raw, list):
        for item in raw:
            check_config_dict(item, where, depth=depth + 1)
        return
    if not isinstance(raw, dict):
        return
    for key in _CODE_FIELDS:
        if key in raw and raw[key] not in (None, False, {}, []):
            raise ShiraInputError(
                f"{where}: field {key!r} selects code to run ({raw[key]!r}); this package loads "
                f"no code from model folders (remove the field)"
            )
    for key in _ATTENTION_FIELDS:
        if key in raw and raw[key] not in _BUILTIN_ATTENTION:
            raise ShiraInputError(
                f"{where}: field {key!r} = {raw[key]!r} is not a built-in attention "
                f"implementation (expected one of {sorted(x for x in _BUILTIN_ATTENTION if x)}); "
                f"a hub kernel would be fetched and run"
            )
    for value in raw.values():
        if isinstance(value, (dict, list)):
            check_config_dict(value, where, depth=depth + 1)


def read_config_json(folder: PathLike, *, what: str = "base model folder") -> dict:
    """`folder/config.json` as a checked dict; errors name the file."""
    folder = Path(folder)
    if not folder.exists():
        raise ShiraInputError(f"{folder}: {what} not found (expected a Hugging Face model folder)")
    if not folder.is_dir():
        raise ShiraInputError(f"{folder}: is not a folder (expected a Hugging Face {what})")
    path = folder / "config.json"
    if not path.is_file():
        raise ShiraInputError(f"{folder}: no config.json (expected a Hugging Face {what})")
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise ShiraInputError(f"{path}: {path.stat().st_size} bytes (expected a model config under 16 MiB)")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ShiraInputError(
            f"{path}: not a readable JSON model config ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not isinstance(raw, dict):
        raise ShiraInputError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    check_config_dict(raw, str(path))
    return raw


def load_config(folder: PathLike) -> "PretrainedConfig":
    """The folder's config through transformers, after the checks above."""
    from transformers import AutoConfig

    read_config_json(folder)
    try:
        return AutoConfig.from_pretrained(Path(folder), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShiraInputError(f"{Path(folder) / 'config.json'}: not a readable model config ({exc})") from None


def _check_weights(folder: Path) -> None:
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    found = f"found only {pickles}" if pickles else "found no weight files"
    raise ShiraInputError(
        f"{folder}: expected weights as safetensors (model.safetensors), {found}; pickle files are "
        f"never loaded (they can run code). Convert once in a trusted environment: "
        f"AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
    )


def _takes_dtype() -> bool:
    """transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return (major, minor) >= (4, 56)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers 5 draws a bar per load; ours (tqdm on the whole step) is enough."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def check_folder(folder: PathLike) -> None:
    """The checks `load_model` makes, for tools that load the folder themselves (genai's
    model builder): a config that selects no code, weights as safetensors."""
    read_config_json(folder)
    _check_weights(Path(folder))


def load_model(folder: PathLike, auto_class: Any, **kwargs: Any) -> "PreTrainedModel":
    """`auto_class.from_pretrained(folder)` in eval mode, with nothing in the folder able to
    run code. `kwargs` go to from_pretrained (dtype, num_labels, ...)."""
    from shira_export._quiet import quiet_loggers

    folder = Path(folder)
    read_config_json(folder)
    _check_weights(folder)
    if "dtype" in kwargs and not _takes_dtype():
        kwargs["torch_dtype"] = kwargs.pop("dtype")
    try:
        with quiet_loggers("transformers"), _no_progress_bars():
            model = auto_class.from_pretrained(folder, **SAFE_LOAD_KWARGS, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ShiraInputError(f"{folder}: cannot load as {auto_class.__name__} ({str(exc)[:300]})") from None
    return model.eval()


def load_base_model(folder: PathLike, task: Any, **kwargs: Any) -> "PreTrainedModel":
    """The model in `folder` with the task table's Auto class for `task` (a Task or a task
    name a manifest carries), fp32 unless `dtype` is given (e.g. "auto"), eval mode; `kwargs`
    go to from_pretrained (e.g. num_labels for a fresh classification head)."""
    import torch
    import transformers

    from shira_export.artifacts.tasks import spec_for

    kwargs.setdefault("dtype", torch.float32)  # transformers 5 loads in the checkpoint's dtype otherwise
    return load_model(folder, getattr(transformers, spec_for(task).auto_class), **kwargs)


def find_tokenizer(*folders: PathLike) -> Any:
    """The tokenizer of the first of `folders` that has one (None when none has), loaded
    with `trust_remote_code=False`."""
    from transformers import AutoTokenizer

    for folder in map(Path, folders):
        if any((folder / name).exists() for name in TOKENIZER_MARKERS):
            return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    return None
