"""Inputs for parity checks: seeded token batches at untraced shapes, and a user's texts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from shira_export.errors import ShiraInputError

__all__ = ["InputBatch", "SEEDED_SHAPES", "seeded_batches", "read_texts", "text_batches", "load_tokenizer"]

# optimum traces decoders and encoders with dummy inputs of batch 2 x 16 tokens; these
# shapes avoid both and cover batch 1, batch > 2, odd lengths and a single token.
SEEDED_SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (1, 11), (3, 7), (3, 21))


@dataclass(frozen=True)
class InputBatch:
    """One batch fed to both models. `attention_mask` is all ones (no padding)."""

    name: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: str

    @property
    def shape(self) -> list[int]:
        return list(self.input_ids.shape)

    def describe(self) -> dict:
        return {"name": self.name, "shape": self.shape, "source": self.source}


def seeded_batches(
    vocab_size: int,
    *,
    seed: int = 0,
    shapes: Sequence[tuple[int, int]] = SEEDED_SHAPES,
    max_length: Optional[int] = None,
) -> list[InputBatch]:
    """Random token batches from a seeded generator (same seed -> same tokens)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for batch, length in shapes:
        if max_length is not None:
            length = max(1, min(length, max_length))
        ids = torch.randint(0, vocab_size, (batch, length), generator=gen, dtype=torch.long)
        batches.append(InputBatch(f"seeded-{batch}x{length}", ids, torch.ones_like(ids), f"seeded(seed={seed})"))
    return batches


def read_texts(path: Union[str, Path], *, limit: Optional[int] = None) -> list[str]:
    """Non-empty lines of a .txt file, or the "text" field (or string) of each .jsonl line."""
    path = Path(path)
    if not path.is_file():
        from shira_export._io import describe_path

        raise ShiraInputError(f"{path}: inputs file {describe_path(path, want='file')} (expected a .txt or .jsonl file)")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ShiraInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a .txt or "
                              f".jsonl file") from None
    texts: list[str] = []
    is_jsonl = path.suffix.lower() in {".jsonl", ".ndjson"}
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ShiraInputError(f"{path}:{lineno}: expected a JSON object per line, found invalid JSON ({exc.msg})") from None
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                item = item["text"]
            if not isinstance(item, str):
                raise ShiraInputError(f"{path}:{lineno}: expected a string or an object with a string 'text' key, found {type(item).__name__}")
            texts.append(item)
        else:
            texts.append(line.rstrip("\n"))
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ShiraInputError(f"{path}: inputs file has no texts (expected one per line)")
    return texts


def load_tokenizer(*folders: Union[str, Path]):
    """The first tokenizer found among `folders` (the candidate's, then the base model's)."""
    from transformers import AutoTokenizer

    tried = []
    for folder in folders:
        folder = Path(folder)
        if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
            return AutoTokenizer.from_pretrained(folder)
        tried.append(str(folder))
    raise ShiraInputError(
        f"--inputs needs a tokenizer: none found in {tried} (expected tokenizer.json or tokenizer_config.json)"
    )


def text_batches(
    texts: Sequence[str], tokenizer, *, source: str, max_length: int, vocab_size: Optional[int] = None
) -> list[InputBatch]:
    """One batch of 1 per text, so no padding enters the comparison."""
    batches = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"].long()
        if ids.shape[1] == 0:
            continue
        if vocab_size is not None and int(ids.max()) >= vocab_size:
            raise ShiraInputError(
                f"{source}: line {i + 1} tokenizes to id {int(ids.max())}, past the model's vocab_size {vocab_size} "
                "(the tokenizer does not belong to this model)"
            )
        batches.append(InputBatch(f"text-{i}", ids, torch.ones_like(ids), source))
    return batches
