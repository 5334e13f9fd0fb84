"""Causal-LM generation on a sparse export with the KV cache, adapter chosen per call.

A thin wrapper rather than an optimum `ORTModelForCausalLM` subclass: optimum's class
runs `session.run(None, ...)` with no run options and keeps per-model state, so it can
neither pass an adapter per call nor serve concurrent callers with different adapters.
`generate()` follows transformers' conventions (input_ids/attention_mask in, prompt +
new tokens out as a LongTensor; greedy or sampling with temperature/top-k/top-p; EOS ends
a row, which is then padded) and transformers' own logits warpers do the sampling math.

`adapter` is a name, None (the base model) or a list with one of those per row: a mixed
batch runs in one call per step (left padding and the KV cache as for any batch), and a
decode loop reuses the stacked adapter feeds of its first step (`runtime.batching`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union, cast

import numpy as np
import torch

from shira_export.errors import ShiraInputError
from shira_export.runtime.plain import PlainSession
from shira_export.runtime.batching import check_adapter_list
from shira_export.runtime.session import AdapterChoice, Mode, ShiraSession

__all__ = ["ShiraORTModelForCausalLM", "CausalLMOutput"]

PathLike = Union[str, os.PathLike]


@dataclass
class CausalLMOutput:
    logits: np.ndarray  # [batch, tokens, vocab]
    past_key_values: list  # OrtValues in the graph's present.* order, fed back as past_key_values.*


class ShiraORTModelForCausalLM:
    """`model = ShiraORTModelForCausalLM("out")`; `model.generate(ids, adapter="a")`."""

    def __init__(
        self,
        folder_or_session: Union[PathLike, ShiraSession, "PlainSession"],
        *,
        mode: Union[Mode, str, None] = None,
        **session_kwargs,
    ) -> None:
        # a sparse folder opens a ShiraSession; a session passed in (ShiraSession, or a
        # PlainSession over a merged folder) is used as it is
        self.session = (
            ShiraSession(folder_or_session, mode=mode, **session_kwargs)
            if isinstance(folder_or_session, (str, os.PathLike))
            else folder_or_session
        )
        inputs = {i.name: i for i in self.session.session.get_inputs()}
        if "input_ids" not in inputs:
            raise ShiraInputError(f"{self.session.manifest.folder}: the graph has no input_ids (not a language model)")
        self._past_names = [n for n in self.session.input_names if n.startswith("past_key_values.")]
        self._present_names = ["present." + n[len("past_key_values.") :] for n in self._past_names]
        missing = sorted(set(self._present_names) - set(self.session.output_names))
        if missing:
            raise ShiraInputError(f"{self.session.manifest.folder}: KV cache outputs {missing} not found")
        if not self._past_names:
            raise ShiraInputError(
                f"{self.session.manifest.folder}: the graph has no past_key_values inputs "
                f"(export with task text-generation-with-past for generation)"
            )
        self._past_shapes = {}
        for name in self._past_names:
            shape = inputs[name].shape  # [batch, heads, past, head_dim]
            if not (len(shape) == 4 and isinstance(shape[1], int) and isinstance(shape[3], int)):
                raise ShiraInputError(
                    f"{name}: expected [batch, heads, past, head_dim] with fixed heads, found {shape}"
                )
            self._past_shapes[name] = (shape[1], shape[3])
        self._float = np.float16 if "float16" in inputs[self._past_names[0]].type else np.float32
        self._has_positions = "position_ids" in inputs
        self._has_mask = "attention_mask" in inputs
        self.config = _read_config(self.session.manifest.folder)

    @property
    def adapters(self) -> list[str]:
        return self.session.adapters

    def forward(
        self, input_ids, attention_mask=None, *, adapter: AdapterChoice = None, past_key_values: Optional[list] = None
    ) -> CausalLMOutput:
        """One step: logits for `input_ids` given the cache (None = empty). `attention_mask`
        covers past + new tokens; `adapter` may give one adapter (or None) per row."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ShiraInputError(f"input_ids: expected [batch, tokens], found shape {list(ids.shape)}")
        batch, n_new = ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0].shape()[2]
        mask = (
            np.ones((batch, past_len + n_new), np.int64)
            if attention_mask is None
            else np.asarray(attention_mask, dtype=np.int64)
        )
        feeds: dict = {"input_ids": ids}
        if self._has_mask:
            feeds["attention_mask"] = mask
        if self._has_positions:
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
            feeds["position_ids"] = np.ascontiguousarray(positions[:, past_len:])
        for i, name in enumerate(self._past_names):
            if past_key_values is None:
                heads, dim = self._past_shapes[name]
                feeds[name] = np.zeros((batch, heads, 0, dim), self._float)
            else:
                feeds[name] = past_key_values[i]
        outs = self.session.run_ort_values(feeds, adapter=adapter, output_names=["logits"] + self._present_names)
        return CausalLMOutput(outs[0].numpy(), outs[1:])

    __call__ = forward

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        adapter: AdapterChoice = None,
        max_new_tokens: int = 20,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: Union[int, Sequence[int], None] = None,
        pad_token_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        num_beams: int = 1,
        use_cache: bool = True,
    ) -> torch.LongTensor:
        """Prompt + up to `max_new_tokens` tokens per row (transformers' return convention).
        `adapter=["a", "b", None]`: row i generates with adapter i (None: the base model)."""
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        if num_beams != 1 or not use_cache:
            raise ShiraInputError("generate: only num_beams=1 with use_cache=True is supported")
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        if ids.ndim != 2:
            raise ShiraInputError(f"input_ids: expected [batch, tokens], found shape {list(ids.shape)}")
        if isinstance(adapter, (list, tuple)):
            adapter = list(check_adapter_list(adapter, ids.shape[0]))  # before any step runs
        mask = (
            torch.ones_like(ids)
            if attention_mask is None
            else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        )
        if eos_token_id is None:
            eos_token_id = getattr(self.config, "eos_token_id", None)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        vocab = next(o.shape[-1] for o in self.session.session.get_outputs() if o.name == "logits")
        eos = [e for e in eos if not isinstance(vocab, int) or 0 <= e < vocab]  # a config's EOS may not exist
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        out, step_ids, past = ids, ids, None
        for step in range(max_new_tokens):
            result = self.forward(step_ids.numpy(), mask.numpy(), adapter=adapter, past_key_values=past)
            logits = torch.from_numpy(result.logits[:, -1, :]).float()
            past = result.past_key_values
            if step < min_new_tokens and eos:
                logits[:, eos] = -float("inf")
            if do_sample:
                probs = torch.softmax(warpers(cast(torch.LongTensor, out), logits), dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(dim=-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            out = torch.cat([out, token[:, None]], dim=1)
            if eos:
                done |= torch.isin(token, torch.tensor(eos))
                if bool(done.all()):
                    break
            step_ids = token[:, None]
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        return cast(torch.LongTensor, out)


def _read_config(folder):
    from shira_export.artifacts.hf_folder import load_config

    if not (Path(folder) / "config.json").is_file():
        return None  # a folder without config.json still runs; EOS must then be passed explicitly
    return load_config(folder)
