"""Tiny seeded transformers models built from configs (no downloads), shared by tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB = 128


def tiny_opt(seed: int = 0, vocab_size: int = VOCAB, **extra) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        **extra,
    )
    return OPTForCausalLM(cfg).eval()


def tiny_llama(seed: int = 0, vocab_size: int = VOCAB, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        **extra,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = VOCAB, **extra) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=128, **extra)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, vocab_size: int = VOCAB, **extra) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        **extra,
    )
    return BertModel(cfg).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def main_output(out) -> torch.Tensor:
    """logits for LMs and classifiers, last_hidden_state for encoders."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
