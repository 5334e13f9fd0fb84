"""`genai_config.json` for a causal-LM export folder, so `onnxruntime_genai.Model(folder)` runs it.

Everything genai must know about the graph is read from the graph itself (input and
output names, the KV-cache name templates, kv heads and head size where the graph fixes
them); what the graph cannot say (hidden size, attention heads, context length, special
tokens) comes from the folder's `config.json` / `generation_config.json`.

    model.type "decoder"                        genai's generic decoder-only pipeline
    model.decoder.inputs / outputs              the graph's own names, %d for the layer
    search.past_present_share_buffer false      optimum / torch graphs grow the cache by Concat

A folder without a KV cache (encoders, classifiers, a causal LM exported without past)
is not a genai folder: `write_genai_config` returns None and writes nothing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import onnx

from shira_export._io import atomic_write_text
from shira_export.errors import ShiraInputError

__all__ = ["GENAI_CONFIG_NAME", "genai_config", "write_genai_config", "ensure_genai_tokenizer"]

GENAI_CONFIG_NAME = "genai_config.json"
PathLike = Union[str, os.PathLike]
_LAYER = re.compile(r"(?<![0-9])([0-9]+)(?![0-9])")


def _dims(value_info) -> list:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value_info.type.tensor_type.shape.dim
    ]


def _templates(names: list[str], where: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Group per-layer cache names into key / value templates ("past_key_values.%d.key")."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        numbers = list(_LAYER.finditer(name))
        if not numbers:
            continue
        last = numbers[-1]  # the layer index; earlier numbers belong to the name itself
        template = name[: last.start()] + "%d" + name[last.end() :]
        groups.setdefault(template, []).append((int(last.group(1)), name))
    out: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for template, items in groups.items():
        low = template.lower()
        role = (
            "key"
            if "key" in low.replace("key_values", "")
            else "value"
            if "value" in low.replace("key_values", "")
            else None
        )
        if role is None:
            continue
        if role in out:
            raise ShiraInputError(
                f"{where}: two {role} cache name patterns ({out[role]!r}, {template!r}); expected one per role"
            )
        layers = sorted(i for i, _ in items)
        if layers != list(range(len(layers))):
            raise ShiraInputError(
                f"{where}: cache inputs {template!r} cover layers {layers}, expected 0..{len(layers) - 1}"
            )
        out[role] = template
        members[role] = [n for _, n in sorted(items)]
    return out, members


def _config_value(config: dict, *keys: str):
    for scope in (config, config.get("text_config") or {}):
        for key in keys:
            if scope.get(key) is not None:
                return scope[key]
    return None


def genai_config(folder: PathLike, *, model_file: str = "model.onnx") -> Optional[dict]:
    """The genai_config.json content for `folder` (None: the graph has no KV cache)."""
    folder = Path(folder)
    model_path, config_path = folder / model_file, folder / "config.json"
    for path in (model_path, config_path):
        if not path.is_file():
            raise ShiraInputError(f"{path}: not found (expected an export folder with {model_file} and config.json)")
    graph = onnx.load(str(model_path), load_external_data=False).graph
    overridable = {i.name for i in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in overridable}  # shira.* inputs have defaults
    outputs = {o.name: o for o in graph.output}
    where = str(model_path)
    past, past_members = _templates(
        [n for n in inputs if n not in ("input_ids", "attention_mask", "position_ids")], where
    )
    present, present_members = _templates(list(outputs), where)
    if set(past) != {"key", "value"}:
        return None  # no KV cache: not something genai's decoder runs
    if set(present) != {"key", "value"}:
        raise ShiraInputError(
            f"{where}: cache inputs {past} but no matching present key/value outputs in {sorted(outputs)}"
        )
    layers = len(past_members["key"])
    if not (len(past_members["value"]) == len(present_members["key"]) == len(present_members["value"]) == layers):
        raise ShiraInputError(
            f"{where}: {layers} past keys but {len(past_members['value'])} past values, "
            f"{len(present_members['key'])}/{len(present_members['value'])} present keys/values"
        )
    if "input_ids" not in inputs:
        raise ShiraInputError(f"{where}: no input_ids input (genai feeds token ids); inputs are {sorted(inputs)}")
    known = {"input_ids", "attention_mask", "position_ids", *past_members["key"], *past_members["value"]}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise ShiraInputError(f"{where}: required inputs {unknown} that genai does not feed")
    logits = "logits" if "logits" in outputs else None
    if logits is None:
        rest = sorted(set(outputs) - set(present_members["key"]) - set(present_members["value"]))
        if len(rest) != 1:
            raise ShiraInputError(f"{where}: cannot tell the logits output among {rest}")
        logits = rest[0]

    config = json.loads(config_path.read_text())
    generation = folder / "generation_config.json"
    gen = json.loads(generation.read_text()) if generation.is_file() else {}
    kv_dims = _dims(inputs[past_members["key"][0]])  # [batch, kv_heads, past, head_size]
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
    heads = _config_value(config, "num_attention_heads", "n_head")
    if hidden is None or heads is None:
        raise ShiraInputError(f"{config_path}: expected hidden_size and num_attention_heads (or n_embd / n_head)")
    kv_heads = (
        kv_dims[1]
        if len(kv_dims) == 4 and isinstance(kv_dims[1], int)
        else (_config_value(config, "num_key_value_heads") or heads)
    )
    head_size = (
        kv_dims[3]
        if len(kv_dims) == 4 and isinstance(kv_dims[3], int)
        else (_config_value(config, "head_dim") or hidden // heads)
    )
    logit_dims = _dims(outputs[logits])
    vocab = logit_dims[-1] if logit_dims and isinstance(logit_dims[-1], int) else _config_value(config, "vocab_size")
    context = _config_value(config, "max_position_embeddings", "n_positions", "max_sequence_length") or 2048

    def token(key: str):
        value = gen.get(key, _config_value(config, key))
        return value

    eos = token("eos_token_id")
    bos = token("bos_token_id")
    pad = token("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) and eos else eos
    decoder_inputs = {"input_ids": "input_ids", "past_key_names": past["key"], "past_value_names": past["value"]}
    for name in ("attention_mask", "position_ids"):
        if name in inputs:
            decoder_inputs[name] = name
    model = {
        "type": "decoder",
        "vocab_size": int(vocab),
        "context_length": int(context),
        "decoder": {
            # the sparse graphs' shira.* inputs are overridable initializers: ORT warns once per
            # input at load, intended here, so genai's sessions log errors only
            "session_options": {"log_id": "onnxruntime-genai", "log_severity_level": 3, "provider_options": []},
            "filename": model_file,
            "head_size": int(head_size),
            "hidden_size": int(hidden),
            "num_attention_heads": int(heads),
            "num_key_value_heads": int(kv_heads),
            "num_hidden_layers": layers,
            "inputs": decoder_inputs,
            "outputs": {"logits": logits, "present_key_names": present["key"], "present_value_names": present["value"]},
        },
    }
    for key, value in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)):
        if value is not None:
            model[key] = value
    search = {
        "do_sample": False,
        "num_beams": 1,
        "num_return_sequences": 1,
        "min_length": 0,
        "max_length": int(context),
        "past_present_share_buffer": False,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
    }
    return {"model": model, "search": search}


def ensure_genai_tokenizer(folder: PathLike) -> Optional[Path]:
    """genai reads `tokenizer.json` (+ `tokenizer_config.json`): write them from a slow
    tokenizer's files (vocab.json / merges.txt, sentencepiece) when only those are there.
    Returns tokenizer.json, or None when the folder has no tokenizer at all."""
    folder = Path(folder)
    target = folder / "tokenizer.json"
    if target.is_file():
        return target
    if not any((folder / n).is_file() for n in ("vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, use_fast=True, local_files_only=True, trust_remote_code=False)
    except Exception:  # a tokenizer transformers cannot convert: genai runs the model without one
        return None
    if not getattr(tok, "is_fast", False):
        return None
    tok.backend_tokenizer.save(str(target))
    if not (folder / "tokenizer_config.json").is_file():
        tok.save_pretrained(folder)  # writes tokenizer_config.json (and rewrites tokenizer.json the same)
    return target


def write_genai_config(folder: PathLike, *, model_file: str = "model.onnx", overwrite: bool = True) -> Optional[Path]:
    """Write `folder/genai_config.json` (atomically) for a causal-LM export with a KV cache;
    returns its path, or None (nothing written) when the graph has no KV cache. Also makes
    sure the tokenizer files genai reads are there (see `ensure_genai_tokenizer`)."""
    folder = Path(folder)
    target = folder / GENAI_CONFIG_NAME
    if target.exists() and not overwrite:
        raise ShiraInputError(f"{target}: exists (pass overwrite=True to replace it)")
    content = genai_config(folder, model_file=model_file)
    if content is None:
        return None
    ensure_genai_tokenizer(folder)
    return atomic_write_text(target, json.dumps(content, indent=4) + "\n")
