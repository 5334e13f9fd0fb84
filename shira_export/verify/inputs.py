"""Inputs for parity checks: seeded token batches at untraced shapes, long and padded
batches, the built-in sentence set (verify.sentences) through the model's tokenizer, and a
user's texts.

Padding: encoders (and every forward comparison) pad on the right, so valid tokens keep
their positions whatever a runtime derives them from; decoders generate from left-padded
prompts, as batched generation does. Padded positions are not compared."""

from __future__ import annotations

import os
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from shira_export.artifacts.hf_folder import find_tokenizer
from shira_export.errors import ShiraInputError

__all__ = [
    "InputBatch",
    "SEEDED_SHAPES",
    "LONG_LENGTH",
    "seeded_batches",
    "read_texts",
    "text_batches",
    "load_tokenizer",
    "find_tokenizer",
    "default_batches",
]

# optimum traces decoders and encoders with dummy inputs of batch 2 x 16 tokens; these
# shapes avoid both and cover batch 1, batch > 2, odd lengths and a single token.
SEEDED_SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (1, 11), (3, 7), (3, 21))
LONG_LENGTH = 128  # the long batch: a usual sentence/prompt range (or the model's positions when fewer)
TEXT_BATCH = 16  # built-in sentences per padded batch


@dataclass(frozen=True)
class InputBatch:
    """One batch fed to both models; zeros in `attention_mask` are padding (not compared)."""

    name: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: str
    forward: bool = True  # compared in a forward pass
    generate: bool = True  # causal LMs also generate greedily from it

    @property
    def shape(self) -> list[int]:
        return list(self.input_ids.shape)

    @property
    def padded(self) -> bool:
        return not bool(self.attention_mask.all())

    def describe(self) -> dict:
        out = {"name": self.name, "shape": self.shape, "source": self.source}
        if self.padded:
            out["lengths"] = [int(n) for n in self.attention_mask.sum(1)]
        if not (self.forward and self.generate):
            out["used_for"] = "forward" if self.forward else "generate"
        return out


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


def read_texts(path: Union[str, "os.PathLike[str]"], *, limit: Optional[int] = None) -> list[str]:
    """Non-empty lines of a .txt file, or the "text" field (or string) of each .jsonl line."""
    path = Path(path)
    if not path.is_file():
        from shira_export._io import describe_path

        raise ShiraInputError(
            f"{path}: inputs file {describe_path(path, want='file')} (expected a .txt or .jsonl file)"
        )
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ShiraInputError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a .txt or .jsonl file"
        ) from None
    texts: list[str] = []
    is_jsonl = path.suffix.lower() in {".jsonl", ".ndjson"}
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ShiraInputError(
                    f"{path}:{lineno}: expected a JSON object per line, found invalid JSON ({exc.msg})"
                ) from None
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                item = item["text"]
            if not isinstance(item, str):
                raise ShiraInputError(
                    f"{path}:{lineno}: expected a string or an object with a string 'text' key, found {type(item).__name__}"
                )
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
    tokenizer = find_tokenizer(*folders)
    if tokenizer is None:
        raise ShiraInputError(
            f"--inputs needs a tokenizer: none found in {[str(f) for f in folders]} (expected "
            f"tokenizer.json or tokenizer_config.json)"
        )
    return tokenizer


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


def _pad(rows: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _padded_pair(
    name: str, rows: Sequence[Sequence[int]], pad_id: int, source: str, *, causal: bool
) -> list[InputBatch]:
    """Right padding for the forward comparison; decoders also generate from a left-padded copy."""
    ids, mask = _pad(rows, pad_id, "right")
    if not causal:
        return [InputBatch(name, ids, mask, source, generate=False)]
    left_ids, left_mask = _pad(rows, pad_id, "left")
    return [
        InputBatch(name, ids, mask, source, generate=False),
        InputBatch(name + "-left", left_ids, left_mask, source, forward=False),
    ]


def default_batches(
    vocab_size: int,
    *,
    seed: int,
    max_length: int,
    causal: bool,
    tokenizer=None,
    pad_token_id: Optional[int] = None,
    text_limit: Optional[int] = None,
) -> list[InputBatch]:
    """Every run's inputs: the seeded shapes, one long batch (LONG_LENGTH tokens, or
    `max_length` when smaller), one padded seeded batch, and, with a tokenizer, the built-in
    sentences (verify.sentences) encoded with its special tokens in padded batches."""
    from shira_export.verify.sentences import SENTENCES

    batches = seeded_batches(vocab_size, seed=seed, max_length=max_length)
    long = min(LONG_LENGTH, max_length)
    gen = torch.Generator().manual_seed(seed + 1)
    batches.append(
        InputBatch(
            f"seeded-2x{long}",
            *(lambda ids: (ids, torch.ones_like(ids)))(
                torch.randint(0, vocab_size, (2, long), generator=gen, dtype=torch.long)
            ),
            f"seeded(seed={seed + 1})",
            generate=False,
        )
    )  # forward only: a long prompt plus greedy tokens would pass the positions
    pad = 0 if pad_token_id is None or not 0 <= int(pad_token_id) < vocab_size else int(pad_token_id)
    lengths = [min(n, max_length) for n in (17, 9, 2)]
    rows = [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]
    batches += _padded_pair(f"padded-3x{lengths[0]}", rows, pad, f"seeded(seed={seed + 1})", causal=causal)
    if tokenizer is None:
        return batches
    texts = list(SENTENCES[:text_limit] if text_limit else SENTENCES)
    encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    encoded = [e for e in encoded if e]
    if any(max(e) >= vocab_size for e in encoded):
        raise ShiraInputError(
            f"the tokenizer found with the model gives ids past its vocab_size {vocab_size} "
            f"(the tokenizer does not belong to this model)"
        )
    tok_pad = getattr(tokenizer, "pad_token_id", None)
    tok_pad = tok_pad if tok_pad is not None else getattr(tokenizer, "eos_token_id", None)
    pad = pad if tok_pad is None or not 0 <= tok_pad < vocab_size else int(tok_pad)
    for start in range(0, len(encoded), TEXT_BATCH):
        chunk = encoded[start : start + TEXT_BATCH]
        pair = _padded_pair(
            f"sentences-{start}-{start + len(chunk) - 1}", chunk, pad, "builtin sentences", causal=causal
        )
        if start:  # greedy generation from the first text batch only (cost)
            pair = [b for b in pair if b.forward]
        batches += pair
    return batches
