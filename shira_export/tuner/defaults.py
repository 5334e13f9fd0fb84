"""Default `target_modules` per `config.model_type`, used when a config leaves them None.

The same model types and targets as PEFT 0.21's SHiRA mapping (which is its LoRA
mapping, with `phi` set to the attention projections), plus DistilBERT, which PEFT's
mapping lacks. GPT-2 and GPTBigCode target `c_attn`: on GPT-2 that is a transformers
Conv1D, which this package adapts and PEFT's SHiRA does not. A value is a list of names
(a module matches when its path ends with "." + name) or a regex (full match).
"""

from __future__ import annotations

from typing import Union

__all__ = ["DEFAULT_TARGET_MODULES"]

_QV = ["q_proj", "v_proj"]
_QUERY_VALUE = ["query", "value"]

DEFAULT_TARGET_MODULES: dict[str, Union[list[str], str]] = {
    # encoder-decoder
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": _QV,
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    # encoders
    "bert": _QUERY_VALUE,
    "roberta": _QUERY_VALUE,
    "xlm-roberta": _QUERY_VALUE,
    "electra": _QUERY_VALUE,
    "layoutlm": _QUERY_VALUE,
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    # decoders with fused qkv
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "btlm": ["c_proj", "c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "chatglm": ["query_key_value"],
    "falcon": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "RefinedWebModel": ["query_key_value"],
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
    # decoders with separate projections
    "opt": _QV,
    "gptj": _QV,
    "gpt_neo": _QV,
    "llama": _QV,
    "llama4": _QV,
    "mistral": _QV,
    "mixtral": _QV,
    "stablelm": _QV,
    "phi": _QV,
    "gemma": _QV,
    "gemma2": _QV,
    "gemma3_text": _QV,
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": _QV,
    "qwen3": _QV,
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    # recurrent
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}
