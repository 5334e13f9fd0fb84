"""Artifacts for the verify tests: tiny base models, SHiRA adapters, merged exports with manifests."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch

from shira_export import ShiraConfig, get_shira_model

VOCAB_WORDS = 128


def save_word_tokenizer(folder: Path, vocab_size: int = VOCAB_WORDS) -> None:
    """A whitespace word-level tokenizer over w1..w{n-1} ([UNK] = 0) saved into `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def make_adapter(
    model_fn, folder: Path, *, targets: list[str], seed: int, scale: float = 1.0, **cfg
) -> torch.nn.Module:
    """Save a random SHiRA adapter for `model_fn()` into `folder`; return the merged model."""
    shira = get_shira_model(
        model_fn(), ShiraConfig(r=4, target_modules=targets, init_weights=False, random_seed=seed, **cfg)
    )
    if scale != 1.0:
        with torch.no_grad():
            for p in shira.parameters():
                if p.requires_grad:
                    p.mul_(scale)
    shira.save_pretrained(folder)
    return shira.merge_and_unload().eval()


def write_manifest(
    folder: Path,
    *,
    task: str,
    fmt: str = "onnx",
    name: Optional[str] = "default",
    source: Optional[Path] = None,
    dtype: str = "fp32",
) -> None:
    adapter = None if name is None else {"name": name, "source": str(source) if source else None}
    manifest = {"schema": 1, "kind": "merged", "format": fmt, "task": task, "dtype": dtype, "adapter": adapter}
    (folder / "shira_export.json").write_text(json.dumps(manifest, indent=2))


def export_merged_onnx(merged: torch.nn.Module, hf_dir: Path, out: Path, *, task: str, source: Optional[Path]) -> Path:
    """Save `merged` as an HF folder and export it with the installed exporter (auto: optimum
    where installed, else torch.onnx), as the merged exporter does."""
    from shira_export.export.exporters import choose_exporter, export_onnx

    merged.save_pretrained(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(merged, out, task=task, exporter=choose_exporter("auto", merged.config, task))
    write_manifest(out, task=task, source=source)
    return out
