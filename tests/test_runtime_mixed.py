"""Mixed adapters in one batch: `run(feeds, adapter=["a", "b", None])` and
`generate(..., adapter=[...])` equal running every row alone, with the KV cache and left
padding, over adapters of different nnz and different targeted modules."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from sparse_models import make_adapter, make_base  # noqa: E402

from shira_export.errors import ShiraInputError  # noqa: E402
from shira_export import export_sparse  # noqa: E402
from shira_export.runtime import Mode, ShiraORTModelForCausalLM, ShiraSession  # noqa: E402

ADAPTERS = {  # different r (nnz) and different modules; "c" shares q_proj with "a" only
    "a": dict(r=2, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, target_modules=["k_proj", "out_proj", "fc1"]),
    "c": dict(r=1, target_modules=["q_proj", "fc2"]),
}
ROWS = ["a", None, "b", "c", "a"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime_mixed")
    base = make_base("opt", root)
    dirs = {n: make_adapter("opt", base, root, n, seed=20 + i, **cfg) for i, (n, cfg) in enumerate(ADAPTERS.items())}
    return export_sparse(base, dirs, root / "out", verify=False).output_dir


def _padded(batch: int, tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts (OPT pad id 1): row i has i % 3 pad tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 100, (batch, tokens), dtype=np.int64)
    mask = np.ones_like(ids)
    for i in range(batch):
        ids[i, : i % 3], mask[i, : i % 3] = 1, 0
    return ids, mask


def _steps(lm: ShiraORTModelForCausalLM, ids, mask, adapter, tokens) -> list[np.ndarray]:
    """Logits of a prefill and of one decode step per column of `tokens`, through the KV cache."""
    out = lm.forward(ids, mask, adapter=adapter)
    logits = [out.logits]
    for t in range(tokens.shape[1]):
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        out = lm.forward(tokens[:, t : t + 1], mask, adapter=adapter, past_key_values=out.past_key_values)
        logits.append(out.logits)
    return logits


@pytest.mark.parametrize("mode", [Mode.LEAN, Mode.PORTABLE])
def test_mixed_batch_equals_rows_alone_with_cache_and_padding(folder, mode):
    lm = ShiraORTModelForCausalLM(folder, mode=mode)
    ids, mask = _padded(len(ROWS), 7)
    tokens = np.random.default_rng(1).integers(2, 100, (len(ROWS), 4), dtype=np.int64)
    mixed = _steps(lm, ids, mask, ROWS, tokens)
    base = _steps(lm, ids, mask, None, tokens)
    for i, name in enumerate(ROWS):
        alone = _steps(lm, ids[i : i + 1], mask[i : i + 1], name, tokens[i : i + 1])
        for step, (m, a) in enumerate(zip(mixed, alone)):
            keep = mask[i, :].astype(bool) if step == 0 else slice(None)  # padded positions' logits are unused
            err = float(np.abs(m[i][keep] - a[0][keep]).max())
            assert err <= 1e-5, f"row {i} ({name}) step {step}: max|diff| {err}"
        # an adapter row is not the base row (the rows' adapters really were applied)
        moved = float(np.abs(mixed[-1][i] - base[-1][i]).max())
        assert (moved > 1e-3) if name else (moved <= 1e-5), (i, name, moved)


def test_generate_mixed_equals_rows_alone_and_reuses_the_stacked_feeds(folder):
    session = ShiraSession(folder)
    lm = ShiraORTModelForCausalLM(session)
    ids, mask = _padded(len(ROWS), 5, seed=3)
    got = lm.generate(ids, mask, adapter=ROWS, max_new_tokens=12, min_new_tokens=12)
    assert session._mixed.misses == 1 and session._mixed.hits >= 11  # stacked once for 12 steps
    for i, name in enumerate(ROWS):
        alone = lm.generate(ids[i : i + 1], mask[i : i + 1], adapter=name, max_new_tokens=12, min_new_tokens=12)
        assert torch.equal(got[i], alone[0]), (i, name)
        unpadded = lm.generate(ids[i : i + 1, i % 3 :], adapter=name, max_new_tokens=12, min_new_tokens=12)
        assert torch.equal(got[i, 5:], unpadded[0, 5 - i % 3 :]), (i, name)
    assert len({tuple(r[5:].tolist()) for r in got[:4]}) > 1  # not one continuation for every adapter


def test_one_distinct_adapter_in_a_list_runs_the_single_adapter_path(folder):
    session = ShiraSession(folder)
    ids, mask = _padded(3, 4)
    lm = ShiraORTModelForCausalLM(session)
    np.testing.assert_array_equal(
        lm.forward(ids, mask, adapter=["b"] * 3).logits, lm.forward(ids, mask, adapter="b").logits
    )
    np.testing.assert_array_equal(lm.forward(ids, mask, adapter=[None] * 3).logits, lm.forward(ids, mask).logits)
    assert session._mixed.misses == 0


def test_unloading_forgets_cached_rows_and_refuses_the_name(folder):
    session = ShiraSession(folder, mixed_cache=2)
    lm = ShiraORTModelForCausalLM(session)
    ids, mask = _padded(2, 3)
    before = lm.forward(ids, mask, adapter=["a", "b"]).logits
    lm.forward(ids, mask, adapter=["b", None])
    lm.forward(ids, mask, adapter=["c", "a"])  # evicts the oldest: 2 entries at most
    assert len(session._mixed) == 2 and session.mixed_cache_nbytes > 0
    session.unload_adapter("a")
    assert len(session._mixed) == 1  # only ("b", None) is left
    with pytest.raises(ShiraInputError, match="'a': not loaded"):
        lm.forward(ids, mask, adapter=["a", "b"])
    session.load_adapter("a")
    np.testing.assert_array_equal(lm.forward(ids, mask, adapter=["a", "b"]).logits, before)


def test_bad_adapter_lists(folder):
    lm = ShiraORTModelForCausalLM(folder)
    ids, mask = _padded(3, 4)
    with pytest.raises(ShiraInputError, match="2 entries for a batch of 3"):
        lm.forward(ids, mask, adapter=["a", "b"])
    with pytest.raises(ShiraInputError, match="2 entries for a batch of 3"):
        lm.generate(ids, mask, adapter=["a", "b"], max_new_tokens=2)
    with pytest.raises(ShiraInputError, match="'zzz': not loaded"):
        lm.forward(ids, mask, adapter=["a", "zzz", None])
    with pytest.raises(ShiraInputError, match="row 1 is 3"):
        lm.forward(ids, mask, adapter=["a", 3, None])
    with pytest.raises(ShiraInputError, match="empty"):
        lm.session.run({"input_ids": ids}, adapter=[])
    dense = ShiraORTModelForCausalLM(folder, mode=Mode.DENSE)
    with pytest.raises(ShiraInputError, match="mode 'dense'"):
        dense.forward(ids, mask, adapter=["a", "b", None])
    np.testing.assert_allclose(
        dense.forward(ids, mask, adapter=["a"] * 3).logits, lm.forward(ids, mask, adapter="a").logits, atol=1e-5, rtol=0
    )
