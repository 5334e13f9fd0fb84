"""Sparse exports: one base graph, one `.onnx_adapter` per adapter, adapter chosen per call.

Each check runs the two ways users run the folder: as plain onnxruntime runs it
(`Mode.PORTABLE`: the `.onnx_adapter` activated through `RunOptions`, as C#/C++/Java and
genai users run it; outputs named as usual) and the Python runtime's default `Mode.LEAN`
(the adapter's arrays fed per call, mixed batches; outputs suffixed "@lean"). The opt-in
`Mode.DENSE` (merged weight copies) is covered by the runtime's tests.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from shira_export.artifacts.manifest import AdapterEntry, SparseManifest
from shira_export.artifacts.tasks import Family, graph_feeds, spec_for
from shira_export.errors import CandidateError, ShiraInputError
from shira_export.verify.inputs import InputBatch
from shira_export.verify.sessions import session_options

__all__ = ["SparseRunner", "open_sparse"]

LEAN_SUFFIX = "@lean"


class SparseRunner:
    """`CandidateRunner` over `shira_export.runtime` (base model = adapter None)."""

    variants: tuple[str, ...] = ("", LEAN_SUFFIX)

    def __init__(self, manifest: SparseManifest, threads: Optional[int] = None) -> None:
        from shira_export.runtime import Mode, ShiraORTModelForCausalLM, ShiraSession

        self.spec = spec_for(manifest.task)
        self.sessions = {
            "": ShiraSession(
                manifest.folder, mode=Mode.PORTABLE, adapters=[], session_options=session_options(threads)
            ),
        }
        self.sessions[LEAN_SUFFIX] = ShiraSession(
            manifest.folder, mode=Mode.LEAN, adapters=[], session_options=session_options(threads)
        )
        # An adapter file that is refused (damaged, changed since written: sha256) fails its own
        # checks; the other adapters and the base model are still judged.
        self.refused: dict[str, str] = {}
        for session in self.sessions.values():
            for name in session.manifest.adapters:
                try:
                    session.load_adapter(name)
                except ShiraInputError as exc:
                    self.refused[name] = f"adapter {name!r} refused: {exc}"

        self.variants = tuple(self.sessions)
        self.lms = (
            {v: ShiraORTModelForCausalLM(s) for v, s in self.sessions.items()}
            if self.spec.family is Family.CAUSAL_LM
            else {}
        )
        self.config = next(iter(self.lms.values())).config if self.lms else None

    @staticmethod
    def _name(adapter: AdapterEntry) -> Optional[str]:
        return None if adapter.source is None and adapter.file is None else adapter.name

    def _check(self, name: Optional[str]) -> None:
        if name in self.refused:
            raise CandidateError(self.refused[name])

    def forward(self, batch: InputBatch, adapter: AdapterEntry) -> dict[str, np.ndarray]:
        name = self._name(adapter)
        self._check(name)
        ids, mask = batch.input_ids.numpy(), batch.attention_mask.numpy()
        out = {}
        for v, session in self.sessions.items():
            if self.lms:
                out["logits" + v] = np.asarray(self.lms[v].forward(ids, mask, adapter=name).logits, np.float32)
                continue
            feeds = graph_feeds(self.spec, ids, mask, session.input_names)
            names = list(self.spec.outputs)
            result = session.run(feeds, adapter=name, output_names=names)
            out.update({n + v: np.asarray(result[n], np.float32) for n in names})
        return out

    def generate(self, batch: InputBatch, n_tokens: int, adapter: AdapterEntry) -> dict[str, np.ndarray]:
        name = self._name(adapter)
        self._check(name)
        config = self.config
        pad = getattr(config, "pad_token_id", None) if config is not None else None
        prompt = batch.input_ids.shape[1]
        return {
            v: np.asarray(
                lm.generate(
                    batch.input_ids,
                    batch.attention_mask,
                    adapter=name,
                    max_new_tokens=n_tokens,
                    min_new_tokens=n_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            )[:, prompt:]
            for v, lm in self.lms.items()
        }


def open_sparse(manifest: SparseManifest, *, threads: Optional[int] = None) -> SparseRunner:
    """A runner for a sparse export folder."""
    try:
        import shira_export.runtime  # noqa: F401
    except ImportError as exc:
        raise ShiraInputError(
            f"{manifest.folder}: verifying sparse exports needs shira_export.runtime ({exc})"
        ) from None
    return SparseRunner(manifest, threads)
