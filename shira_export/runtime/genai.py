"""Running genai folders: onnxruntime-genai itself, and a plain-onnxruntime runner for the
genai builder's graphs (which `ShiraORTModelForCausalLM` does not drive: no position_ids,
GroupQueryAttention caches whose head size is symbolic in the graph).

    runner = GenaiGraphRunner("out")                      # plain onnxruntime, adapter per call
    runner.logits(ids, mask, adapter="a"); runner.greedy(ids, mask, 8, adapter="a")
    genai_greedy("out", [[5, 17, 33]], 8, adapter="a")    # onnxruntime-genai, token ids in and out

`GenaiCandidate` is the same runner in the shape `shira_export.verify` runs candidates in
(`forward` / `generate` / `variants`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from shira_export.errors import ShiraInputError

__all__ = ["GenaiGraphRunner", "GenaiCandidate", "genai_greedy", "open_genai"]

PathLike = Union[str, os.PathLike]


def _genai_config(folder: Path) -> dict:
    path = folder / "genai_config.json"
    if not path.is_file():
        raise ShiraInputError(f"{path}: not found (expected a genai folder; write it with write_genai_config)")
    return json.loads(path.read_text())


def _adapter_files(folder: Path) -> dict[str, Path]:
    """The folder's adapter files, through the contract's manifest reader (none: merged)."""
    from shira_export.artifacts.manifest import MANIFEST_NAME, SparseManifest, read_manifest

    if not (folder / MANIFEST_NAME).is_file():
        return {}
    manifest = read_manifest(folder)
    if not isinstance(manifest, SparseManifest):
        return {}
    return {name: manifest.adapter_path(name) for name in manifest.adapters}


class GenaiGraphRunner:
    """One onnxruntime session over a genai folder's graph; adapters (its manifest's
    `.onnx_adapter` files) activated per call through RunOptions, as genai does."""

    def __init__(self, folder: PathLike, *, threads: Optional[int] = None) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        config = _genai_config(self.folder)
        dec = config["model"]["decoder"]
        self.inputs, self.outputs = dec["inputs"], dec["outputs"]
        self.layers, self.kv_heads, self.head_size = (
            dec["num_hidden_layers"],
            dec["num_key_value_heads"],
            dec["head_size"],
        )
        self.eos = config["model"].get("eos_token_id")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # shira.* overridable initializers are intended
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(
            str(self.folder / dec["filename"]), options, providers=["CPUExecutionProvider"]
        )
        names = {i.name: i for i in self.session.get_inputs()}
        past0 = names[self.inputs["past_key_names"] % 0]
        self._float = np.float16 if "float16" in past0.type else np.float32
        self._positions = "position_ids" in self.inputs and self.inputs["position_ids"] in names
        self._adapters = {}
        for name, path in _adapter_files(self.folder).items():
            lora = ort.LoraAdapter()
            lora.Load(str(path))
            self._adapters[name] = lora

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def _options(self, adapter: Optional[str]):
        import onnxruntime as ort

        options = ort.RunOptions()
        if adapter is not None:
            if adapter not in self._adapters:
                raise ShiraInputError(
                    f"adapter {adapter!r}: not in {self.folder}/shira_export.json (known: {sorted(self._adapters)})"
                )
            options.add_active_adapter(self._adapters[adapter])
        return options

    def step(self, ids: np.ndarray, mask: np.ndarray, past: Optional[dict], adapter: Optional[str]):
        """One forward: (logits, present) with `mask` over past + new tokens."""
        ids = np.asarray(ids, np.int64)
        batch, new = ids.shape
        feeds = {self.inputs["input_ids"]: ids, self.inputs["attention_mask"]: np.asarray(mask, np.int64)}
        if self._positions:
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
            feeds[self.inputs["position_ids"]] = np.ascontiguousarray(positions[:, -new:]).astype(np.int64)
        for i in range(self.layers):
            for role, template in (("key", self.inputs["past_key_names"]), ("value", self.inputs["past_value_names"])):
                feeds[template % i] = (
                    np.zeros((batch, self.kv_heads, 0, self.head_size), self._float)
                    if past is None
                    else past[(i, role)]
                )
        names = [self.outputs["logits"]] + [
            self.outputs[f"present_{r}_names"] % i for i in range(self.layers) for r in ("key", "value")
        ]
        outs = self.session.run(names, feeds, self._options(adapter))
        present = {(i, r): outs[1 + 2 * i + j] for i in range(self.layers) for j, r in enumerate(("key", "value"))}
        return outs[0], present

    def logits(self, ids, mask=None, *, adapter: Optional[str] = None) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int64)
        return np.asarray(self.step(ids, mask, None, adapter)[0], np.float32)

    def greedy(self, ids, mask=None, n_tokens: int = 8, *, adapter: Optional[str] = None) -> np.ndarray:
        """`n_tokens` greedy tokens per row (no early stop), KV cache on."""
        ids = np.asarray(ids, np.int64)
        mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int64)
        tokens, past, step_ids = [], None, ids
        for _ in range(n_tokens):
            logits, past = self.step(step_ids, mask, past, adapter)
            token = np.asarray(logits[:, -1, :], np.float32).argmax(-1).astype(np.int64)
            tokens.append(token)
            step_ids = token[:, None]
            mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
        return np.stack(tokens, axis=1)


class GenaiCandidate:
    """`shira_export.verify`'s CandidateRunner over a genai folder (`GenaiGraphRunner`)."""

    variants: tuple[str, ...] = ("",)

    def __init__(self, folder: PathLike, *, threads: Optional[int] = None, merged: bool = False) -> None:
        self.runner = GenaiGraphRunner(folder, threads=threads)
        self.merged = merged  # the adapter is in the weights: every call runs the graph as it is

    def _name(self, adapter) -> Optional[str]:
        if self.merged or (adapter.source is None and adapter.file is None):
            return None
        return adapter.name

    def forward(self, batch, adapter) -> dict[str, np.ndarray]:
        return {
            "logits": self.runner.logits(
                batch.input_ids.numpy(), batch.attention_mask.numpy(), adapter=self._name(adapter)
            )
        }

    def generate(self, batch, n_tokens: int, adapter) -> dict[str, np.ndarray]:
        ids, mask = batch.input_ids.numpy(), batch.attention_mask.numpy()
        name = self._name(adapter)
        if mask[:, 0].all():  # no left padding: one batched call
            return {"": self.runner.greedy(ids, mask, n_tokens, adapter=name)}
        # GroupQueryAttention derives positions from the mask's length, which holds for right
        # padding only (as genai pads); a left-padded batch runs row by row, unpadded
        rows = [
            self.runner.greedy(ids[i : i + 1, mask[i].astype(bool)], None, n_tokens, adapter=name)
            for i in range(ids.shape[0])
        ]
        return {"": np.concatenate(rows, axis=0)}


def open_genai(manifest, *, threads: Optional[int] = None) -> GenaiCandidate:
    """A verify runner for a folder whose manifest says `"exporter": "genai"`."""
    return GenaiCandidate(manifest.folder, threads=threads, merged=manifest.raw.get("kind") == "merged")


def genai_greedy(
    folder_or_model,
    prompts: Sequence[Sequence[int]],
    n_tokens: int,
    *,
    adapter: Optional[str] = None,
    adapters=None,
    pad_token_id: Optional[int] = None,
) -> np.ndarray:
    """Greedy tokens from onnxruntime-genai (exactly `n_tokens` per row). Rows of different
    lengths are padded on the right with the config's pad_token_id, genai's convention
    (it masks pad tokens, so a prompt must not contain that id). `adapters`: an
    `og.Adapters` already loaded; else the folder's manifest adapters are loaded. With an
    `og.Model` instead of a folder, ragged prompts need `pad_token_id` (the config's)."""
    import onnxruntime_genai as og

    if isinstance(folder_or_model, (str, os.PathLike)):
        folder = Path(folder_or_model)
        model = og.Model(str(folder))
        if adapters is None and adapter is not None:
            adapters = og.Adapters(model)
            for name, path in _adapter_files(folder).items():
                adapters.load(str(path), name)
        pad = _genai_config(folder)["model"].get("pad_token_id", 0) if pad_token_id is None else pad_token_id
    else:
        model, pad = folder_or_model, pad_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    width = max(len(p) for p in prompts)
    if pad is None:
        if any(len(p) != width for p in prompts):
            raise ShiraInputError("genai_greedy: prompts of different lengths need pad_token_id (genai masks that id)")
        pad = 0
    batch = np.full((len(prompts), width), pad, np.int64)
    for i, row in enumerate(prompts):
        batch[i, : len(row)] = row
    params = og.GeneratorParams(model)
    total = width + n_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(batch)
    while not generator.is_done():
        generator.generate_next_token()
    return np.stack([np.asarray(generator.get_sequence(i))[width:] for i in range(len(prompts))]).astype(np.int64)
