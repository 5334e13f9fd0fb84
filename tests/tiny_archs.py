"""Tiny seeded models of every architecture the exporters promise, built from configs
(random weights, no hub). One row per architecture: config class, kwargs, head, targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

VOCAB = 128
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
)


@dataclass(frozen=True)
class Arch:
    config: str  # transformers config class name
    kwargs: dict
    head: str  # transformers Auto class
    targets: list[str]
    peft_task: Optional[str] = None
    task: str = "auto"  # the export task (auto: from the adapter / the architecture)
    since: str = "4.41"  # first transformers version that has it
    extra: dict = field(default_factory=dict)


ARCHS: dict[str, Arch] = {
    "opt": Arch(
        "OPTConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            vocab_size=VOCAB,
            max_position_embeddings=256,
            word_embed_proj_dim=32,
        ),
        "AutoModelForCausalLM",
        ["q_proj", "v_proj", "fc1"],
        "CAUSAL_LM",
    ),
    "gpt2": Arch(
        "GPT2Config",
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=0, eos_token_id=0),
        "AutoModelForCausalLM",
        ["c_attn", "c_proj"],
        "CAUSAL_LM",
    ),
    "llama": Arch(
        "LlamaConfig", dict(_DECODER), "AutoModelForCausalLM", ["q_proj", "v_proj", "down_proj"], "CAUSAL_LM"
    ),
    "mistral": Arch(
        "MistralConfig",
        dict(_DECODER, sliding_window=None),
        "AutoModelForCausalLM",
        ["q_proj", "k_proj", "o_proj"],
        "CAUSAL_LM",
    ),
    "qwen2": Arch("Qwen2Config", dict(_DECODER), "AutoModelForCausalLM", ["q_proj", "v_proj", "up_proj"], "CAUSAL_LM"),
    "qwen3": Arch(
        "Qwen3Config",
        dict(_DECODER, head_dim=8),
        "AutoModelForCausalLM",
        ["q_proj", "v_proj", "gate_proj"],
        "CAUSAL_LM",
        since="4.51",
    ),
    "gemma3_text": Arch(
        "Gemma3TextConfig",
        dict(_DECODER, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
        "AutoModelForCausalLM",
        ["q_proj", "v_proj", "down_proj"],
        "CAUSAL_LM",
        since="4.50",
    ),
    "phi3": Arch(
        "Phi3Config",
        dict(_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "AutoModelForCausalLM",
        ["qkv_proj", "o_proj"],
        "CAUSAL_LM",
    ),
    "gemma4_text": Arch(
        "Gemma4TextConfig",
        dict(
            _DECODER,
            head_dim=8,
            global_head_dim=8,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
        ),
        "AutoModelForCausalLM",
        ["q_proj", "v_proj", "down_proj"],
        "CAUSAL_LM",
        since="5.7",
    ),
    "bert": Arch(
        "BertConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=256,
        ),
        "AutoModel",
        ["query", "value"],
        "FEATURE_EXTRACTION",
    ),
    "roberta_cls": Arch(
        "RobertaConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=258,
            num_labels=3,
            pad_token_id=1,
        ),
        "AutoModelForSequenceClassification",
        ["query", "value"],
        "SEQ_CLS",
        task="text-classification",
    ),
}


def available(arch: str) -> bool:
    import transformers

    return hasattr(transformers, ARCHS[arch].config)


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of `arch` in eval mode (fp32, eager-free defaults)."""
    import transformers

    spec = ARCHS[arch]
    config = getattr(transformers, spec.config)(**spec.kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.head).from_config(config)
    return model.eval()
