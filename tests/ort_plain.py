"""An exported folder run the way a user without this package runs it: plain onnxruntime,
the graph's standard input names, a greedy loop with the KV cache written here (not the
package's runtime), so tests of exports do not grade the package with itself."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import torch


class PlainOrtModel:
    def __init__(self, folder: Path, file_name: str = "model.onnx") -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(Path(folder) / file_name), options)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]

    def _feeds(self, ids: np.ndarray, mask: np.ndarray, past: list | None, token_type_ids=None) -> dict:
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = (
                np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
            ).astype(np.int64)
        if "position_ids" in self.inputs:
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
            feeds["position_ids"] = positions[:, mask.shape[1] - ids.shape[1] :].astype(np.int64)
        for i, name in enumerate(self.past):
            shape = self.inputs[name].shape
            dtype = np.float16 if "float16" in self.inputs[name].type else np.float32
            feeds[name] = past[i] if past is not None else np.zeros((ids.shape[0], shape[1], 0, shape[3]), dtype)
        return feeds

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        ids = np.asarray(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        outs = dict(zip(self.outputs, self.session.run(None, self._feeds(ids, mask, None, token_type_ids))))
        return SimpleNamespace(logits=outs.get("logits"), last_hidden_state=outs.get("last_hidden_state"))

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 1, **_) -> torch.Tensor:
        """Greedy, no EOS stop: `max_new_tokens` tokens appended to each row."""
        ids = np.asarray(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        out, step, past = ids, ids, None
        presents = ["present." + n[len("past_key_values.") :] for n in self.past]
        for _ in range(max_new_tokens):
            result = dict(zip(self.outputs, self.session.run(None, self._feeds(step, mask, past))))
            token = result["logits"][:, -1].argmax(-1)[:, None]
            past = [result[n] for n in presents]
            out = np.concatenate([out, token], axis=1)
            step, mask = token, np.concatenate([mask, np.ones_like(token)], axis=1)
        return torch.as_tensor(out)
