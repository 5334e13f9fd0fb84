"""shira_export.runtime: adapter chosen per call, concurrent callers, generation."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from sparse_models import make_adapter, make_base  # noqa: E402

from shira_export.errors import ShiraInputError  # noqa: E402
from shira_export import export_sparse  # noqa: E402
from shira_export.runtime import Mode, ShiraORTModelForCausalLM, ShiraSession  # noqa: E402
from shira_export.verify.reference import merged_reference  # noqa: E402

FOUR = {
    "a": dict(r=2, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, target_modules=["k_proj", "out_proj"]),
    "c": dict(r=1, target_modules=["q_proj", "fc1"]),
    "d": dict(r=6, target_modules=["v_proj", "fc2"]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers as tf

    root = tmp_path_factory.mktemp("runtime")
    base = make_base("opt", root)
    adapters = {n: make_adapter("opt", base, root, n, seed=10 + i, **cfg) for i, (n, cfg) in enumerate(FOUR.items())}
    result = export_sparse(base, adapters, root / "out", verify=False)
    base_model = tf.AutoModelForCausalLM.from_pretrained(base).eval()
    refs = {n: merged_reference(base_model, adapters.get(n)) for n in [None, *adapters]}
    return result.output_dir, refs


def _logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize("mode", list(Mode))
def test_eight_threads_four_adapters_one_session(setup, mode):
    folder, refs = setup
    lm = ShiraORTModelForCausalLM(folder, mode=mode)
    rng = np.random.default_rng(0)
    # batch 1, 2 and 3, odd lengths; both delta branches (<= 2 rows per call: activation side)
    inputs = [rng.integers(0, 100, shape, dtype=np.int64) for shape in ((1, 1), (2, 1), (3, 9), (1, 23))]
    expected = {(n, i): _logits(refs[n], ids) for n in refs for i, ids in enumerate(inputs)}
    names = [None, "a", "b", "c", "d"]
    errors: list[str] = []
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        barrier.wait()
        for step in range(12):
            name = names[(t + step) % len(names)]  # every thread switches adapter on every call
            i = (t * 7 + step) % len(inputs)
            got = lm.forward(inputs[i], adapter=name).logits
            err = float(np.abs(got - expected[(name, i)]).max())
            if err > 1e-4:
                errors.append(f"thread {t} step {step} adapter {name}: max|diff| {err}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:5]


def test_adapters_give_different_outputs_and_base_is_base(setup):
    folder, refs = setup
    session = ShiraSession(folder)
    ids = np.arange(1, 12, dtype=np.int64)[None]
    lm = ShiraORTModelForCausalLM(session)
    outs = {n: lm.forward(ids, adapter=n).logits for n in [None, "a", "b", "c", "d"]}
    np.testing.assert_allclose(outs[None], _logits(refs[None], ids), atol=1e-4, rtol=0)
    for n in "abcd":
        assert np.abs(outs[n] - outs[None]).max() > 1e-3
    nnz = session.manifest.adapters["a"]["nnz"]
    held = session.adapter_nbytes("a")  # the default holds its arrays only: 8 bytes per slot or entry
    assert session.mode is Mode.LEAN and held == session._get("a").arrays.nbytes and 8 * nnz <= held <= 10 * nnz
    dense = ShiraSession(folder, mode="dense", adapters=["a"])
    targeted = sum(
        s.out_features * s.in_features * 4 for s in dense.manifest.targets if s.module in dense._get("a").arrays.deltas
    )
    assert dense.adapter_nbytes("a") == held + targeted  # plus a merged copy of every weight it touches


def test_greedy_generation_matches_pytorch_in_every_mode(setup):
    folder, refs = setup
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = refs["d"].generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            pad_token_id=1,
        )
    for mode in Mode:
        got = ShiraORTModelForCausalLM(folder, mode=mode).generate(
            ids, adapter="d", max_new_tokens=32, min_new_tokens=32
        )
        assert torch.equal(got, ref), mode


def test_sampling_is_seeded_and_top_k_1_is_greedy(setup):
    folder, _ = setup
    lm = ShiraORTModelForCausalLM(folder)
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    kw = dict(adapter="c", max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=0.7, top_p=0.9)
    one = lm.generate(ids, generator=torch.Generator().manual_seed(1), **kw)
    two = lm.generate(ids, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(one, two) and one.shape == (1, 13)
    greedy = lm.generate(ids, adapter="c", max_new_tokens=10, min_new_tokens=10)
    top1 = lm.generate(ids, adapter="c", max_new_tokens=10, min_new_tokens=10, do_sample=True, top_k=1)
    assert torch.equal(greedy, top1)


def test_padded_batch_matches_rows_alone(setup):
    folder, _ = setup
    lm = ShiraORTModelForCausalLM(folder)
    short, long = [9, 8, 7], [3, 4, 5, 6, 7]
    ids = np.array([[1, 1] + short, long], dtype=np.int64)  # left padding (OPT pad id 1)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    both = lm.generate(ids, mask, adapter="a", max_new_tokens=8, min_new_tokens=8)
    alone = [lm.generate(np.array([row]), adapter="a", max_new_tokens=8, min_new_tokens=8) for row in (short, long)]
    assert torch.equal(both[0, 5:], alone[0][0, 3:]) and torch.equal(both[1, 5:], alone[1][0, 5:])


def test_unknown_and_unloaded_adapters(setup):
    folder, _ = setup
    session = ShiraSession(folder, adapters=["a"])
    feeds = {"input_ids": np.ones((1, 2), np.int64)}
    with pytest.raises(ShiraInputError, match="not loaded"):
        session.prepare("b")
    with pytest.raises(ShiraInputError, match="not in"):
        session.load_adapter("zzz")
    session.unload_adapter("a")
    assert session.adapters == []
    with pytest.raises(ShiraInputError, match="unknown inputs"):
        session.run(dict(feeds, bogus=np.ones(1)), adapter=None)
    with pytest.raises(ShiraInputError, match="mode"):
        ShiraSession(folder, mode="fast")
