"""Tiny seeded base models and SHiRA adapters for the sparse-export and runtime tests."""

from __future__ import annotations

from pathlib import Path

import torch

from shira_export import ShiraConfig, get_shira_model


def tiny_model(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "opt":
        cfg = tf.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=100,
                           max_position_embeddings=128, word_embed_proj_dim=32)
        return tf.OPTForCausalLM(cfg)
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=100, max_position_embeddings=128)
        return tf.LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=128,
                             bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg)
    if arch == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            vocab_size=100, max_position_embeddings=128)
        return tf.BertModel(cfg)
    raise ValueError(arch)


# per arch: adapters with different r, masks (seeds) and target modules
ADAPTERS = {
    "opt": {"a": dict(r=2, target_modules=["q_proj", "v_proj"]),
            "b": dict(r=4, target_modules=["q_proj", "k_proj", "out_proj", "fc1"])},
    "llama": {"a": dict(r=2, target_modules=["q_proj", "v_proj"]),
              "b": dict(r=3, target_modules=["k_proj", "o_proj", "down_proj"])},
    "gpt2": {"a": dict(r=2, target_modules=["c_attn"]), "b": dict(r=4, target_modules=["c_attn", "c_proj", "c_fc"])},
    "bert": {"a": dict(r=2, target_modules=["query", "value"]), "b": dict(r=4, target_modules=["key", "dense"])},
}


def make_base(arch: str, root: Path) -> Path:
    path = root / f"{arch}_base"
    tiny_model(arch).eval().save_pretrained(path)
    return path


def make_adapter(arch: str, base_dir: Path, root: Path, name: str, seed: int, **cfg) -> Path:
    import transformers as tf

    model = tf.AutoModel.from_pretrained(base_dir) if arch == "bert" else tf.AutoModelForCausalLM.from_pretrained(base_dir)
    shira = get_shira_model(model, ShiraConfig(init_weights=False, random_seed=seed, **cfg))
    path = root / f"{arch}_{name}"
    shira.save_pretrained(path)
    return path


def make_adapters(arch: str, base_dir: Path, root: Path) -> dict[str, Path]:
    return {name: make_adapter(arch, base_dir, root, name, seed=i + 1, **cfg)
            for i, (name, cfg) in enumerate(ADAPTERS[arch].items())}
