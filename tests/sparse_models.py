"""Tiny seeded base models and SHiRA adapters for the sparse-export and runtime tests."""

from __future__ import annotations

from pathlib import Path

from shira_export import ShiraConfig, get_shira_model


def tiny_model(arch: str):
    """The tiny_models builders at a 100-token vocabulary (GPT-2 with token 0 as bos/eos)."""
    from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_opt

    if arch == "gpt2":
        return tiny_gpt2(vocab_size=100, bos_token_id=0, eos_token_id=0)
    builders = {"opt": tiny_opt, "llama": tiny_llama, "bert": tiny_bert}
    if arch not in builders:
        raise ValueError(arch)
    return builders[arch](vocab_size=100)


# per arch: adapters with different r, masks (seeds) and target modules
ADAPTERS = {
    "opt": {
        "a": dict(r=2, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=4, target_modules=["q_proj", "k_proj", "out_proj", "fc1"]),
    },
    "llama": {
        "a": dict(r=2, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=3, target_modules=["k_proj", "o_proj", "down_proj"]),
    },
    "gpt2": {"a": dict(r=2, target_modules=["c_attn"]), "b": dict(r=4, target_modules=["c_attn", "c_proj", "c_fc"])},
    "bert": {"a": dict(r=2, target_modules=["query", "value"]), "b": dict(r=4, target_modules=["key", "dense"])},
}


def make_base(arch: str, root: Path) -> Path:
    path = root / f"{arch}_base"
    tiny_model(arch).eval().save_pretrained(path)
    return path


def make_adapter(arch: str, base_dir: Path, root: Path, name: str, seed: int, **cfg) -> Path:
    import transformers as tf

    model = (
        tf.AutoModel.from_pretrained(base_dir) if arch == "bert" else tf.AutoModelForCausalLM.from_pretrained(base_dir)
    )
    shira = get_shira_model(model, ShiraConfig(init_weights=False, random_seed=seed, **cfg))
    path = root / f"{arch}_{name}"
    shira.save_pretrained(path)
    return path


def make_adapters(arch: str, base_dir: Path, root: Path) -> dict[str, Path]:
    return {
        name: make_adapter(arch, base_dir, root, name, seed=i + 1, **cfg)
        for i, (name, cfg) in enumerate(ADAPTERS[arch].items())
    }
