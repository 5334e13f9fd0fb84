"""An embedded default for the demo, examples and benchmarks: a small built-in text
set for two tasks, a byte-level BPE tokenizer trained on it (no hub), and a small
OPT-shaped causal LM built from a config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

# Two "tasks" with different styles, so two adapters learn visibly different outputs.
TASKS: dict[str, list[str]] = {
    "poet": [
        "the river sings of stone and rain",
        "the moon keeps the old road silver",
        "a small bird carries the morning home",
        "wind in the wheat writes a quiet song",
        "the sea remembers every lantern light",
        "snow settles softly on the sleeping hill",
        "the garden hums with bees and gold",
        "stars fall slowly into the dark lake",
    ],
    "engineer": [
        "the service returns status code two hundred",
        "increase the cache size to reduce latency",
        "the build fails when the test times out",
        "profile the loop before you optimize it",
        "the queue drains at four thousand jobs per second",
        "rotate the keys and restart the workers",
        "the parser rejects a truncated header",
        "measure memory with the allocator statistics",
    ],
}
HELD_OUT: dict[str, list[str]] = {
    "poet": ["the river keeps the morning song", "a quiet moon on the silver sea"],
    "engineer": ["the cache returns the header", "restart the service when the build fails"],
}


def corpus() -> list[str]:
    return [line for lines in list(TASKS.values()) + list(HELD_OUT.values()) for line in lines]


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on the built-in corpus, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="</s>")


def build_base_model(folder: Union[str, os.PathLike], *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a small OPT-shaped model (random weights) and its tokenizer to `folder`."""
    from transformers import OPTConfig, OPTForCausalLM

    folder = Path(folder)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=4 * hidden,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=hidden,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = OPTForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def task_batches(tokenizer, task: str) -> dict[str, torch.Tensor]:
    """The task's training lines as one padded batch with labels (pad positions ignored)."""
    enc = tokenizer([line + tokenizer.eos_token for line in TASKS[task]], return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
