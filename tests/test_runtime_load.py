"""ShiraSession at scale: resident memory per loaded adapter, and serving under load
(16 threads mixing adapters, mixed batches, base calls, loads and unloads).

Memory is the process's resident set (VmRSS in /proc/self/status) around loading 64
adapters of 0.5 MB: what the issue asks is that the default mode holds about an
adapter's file per adapter, not a copy of the targeted weights (2 MB each here)."""

from __future__ import annotations

import ctypes
import gc
import re
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from sparse_models import make_adapter  # noqa: E402

from shira_export.errors import ShiraInputError  # noqa: E402
from shira_export.export.adapter_file import AdapterArrays, short_fingerprint, write_adapter_file  # noqa: E402
from shira_export import export_sparse  # noqa: E402
from shira_export.runtime import ShiraSession  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc")

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def rss() -> int:
    """Resident bytes of this process, after returning freed heap memory to the system
    (glibc keeps freed blocks mapped otherwise; what is measured is what is still referenced)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may stay higher, the bounds below still hold for leaks
        pass
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def random_adapter(session: ShiraSession, path: Path, seed: int, nnz: int, modules=None) -> Path:
    """An adapter file of `nnz` random nonzeros per site (or per site of `modules`) for this graph."""
    rng = np.random.default_rng(seed)
    deltas = {}
    for site in session.manifest.targets:
        if modules is not None and not any(site.module.endswith(m) for m in modules):
            continue
        flat = rng.choice(site.out_features * site.in_features, nnz, replace=False).astype(np.int32)
        deltas[site.module] = (flat, (rng.standard_normal(nnz) * 0.02).astype(np.float32))
    return write_adapter_file(
        path,
        AdapterArrays.from_flat(
            deltas,
            {s.module: (s.out_features, s.in_features) for s in session.manifest.targets},
            short_fingerprint(session.manifest.base_fingerprint),
        ),
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    root = tmp_path_factory.mktemp("runtime_load")
    torch.manual_seed(0)
    cfg = OPTConfig(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=512,
        vocab_size=100,
        max_position_embeddings=64,
        word_embed_proj_dim=256,
    )
    OPTForCausalLM(cfg).eval().save_pretrained(root / "base")
    seed_adapter = make_adapter("opt", root / "base", root, "seed", seed=1, r=2, target_modules=TARGETS)
    return export_sparse(root / "base", {"seed": seed_adapter}, root / "out", verify=False).output_dir


def _feeds(session: ShiraSession, ids: np.ndarray, mask: np.ndarray) -> dict:
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)}
    for i in session.session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
    return feeds


def test_memory_per_adapter_follows_its_file(folder, tmp_path):
    session = ShiraSession(folder, adapters=[])  # the default mode
    paths = [random_adapter(session, tmp_path / f"x{i}.onnx_adapter", seed=i, nnz=8192) for i in range(64)]
    size = paths[0].stat().st_size  # 8 sites x 8192 nonzeros x 8 bytes + headers: ~0.5 MB
    feeds = _feeds(session, np.ones((1, 4), np.int64), np.ones((1, 4), np.int64))
    session.run(feeds)
    start = rss()
    for i, p in enumerate(paths):
        session.load_adapter(f"x{i}", p)
        session.run(feeds, adapter=f"x{i}")  # used once: whatever a call makes resident is counted
    loaded = rss()
    per_adapter = (loaded - start) / 64
    reported = sum(session.adapter_nbytes(f"x{i}") for i in range(64)) / 64
    for i in range(64):
        session.unload_adapter(f"x{i}")
    end = rss()
    # The arrays are the file's payload (1.0x); per adapter a few KB of objects. Below 0.9x
    # the measurement sees nothing (the test would be blind); above 1.5x something holds
    # more than the arrays (the bound is 2x; dense mode would be 4x here, portable 2x).
    assert 0.9 * size <= per_adapter <= 1.5 * size, (per_adapter, size)
    assert abs(reported - per_adapter) <= 0.15 * per_adapter, (reported, per_adapter)  # adapter_nbytes tells the truth
    assert end - start <= 0.1 * (loaded - start), (start, loaded, end)  # unloading gives it back


def test_sixteen_threads_mixed_calls_loads_and_unloads(folder, tmp_path):
    session = ShiraSession(folder, adapters=[])
    stable = {"a": 4096, "b": 2048, "c": 1024}
    for i, (name, nnz) in enumerate(stable.items()):
        session.load_adapter(
            name,
            random_adapter(
                session,
                tmp_path / f"{name}.onnx_adapter",
                100 + i,
                nnz,
                modules=None if name != "c" else ["q_proj", "v_proj"],
            ),
        )
    churn = {f"p{k}": random_adapter(session, tmp_path / f"p{k}.onnx_adapter", 200 + k, 8192) for k in range(3)}
    rng = np.random.default_rng(0)
    shapes = [(1, 5, 0), (2, 3, 1), (3, 6, 2), (4, 2, 0)]  # batch, tokens, left padding of the first row
    inputs = []
    for batch, tokens, pad in shapes:
        ids = rng.integers(2, 100, (batch, tokens), dtype=np.int64)
        mask = np.ones((batch, tokens), np.int64)
        mask[0, :pad], ids[0, :pad] = 0, 1
        inputs.append(_feeds(session, ids, mask))
    names = [None, *stable, *churn]
    specs: list[tuple[int, object]] = []  # (input, adapter): single names, mixed rows, the base
    for i, (batch, _, _) in enumerate(shapes):
        specs += [(i, n) for n in names]
        for k in range(3):
            specs.append((i, [names[(k + j * 2 + i) % len(names)] for j in range(batch)]))
    for name, path in churn.items():
        session.load_adapter(name, path)
    reference = {
        j: session.run(inputs[i], adapter=a, output_names=["logits"])["logits"] for j, (i, a) in enumerate(specs)
    }
    uses_churn = {j for j, (_, a) in enumerate(specs) if set(a if isinstance(a, list) else [a]) & set(churn)}
    for name in churn:
        session.unload_adapter(name)

    errors: list[BaseException] = []
    stats = {"ok": 0, "refused": 0, "loads": 0}
    lock = threading.Lock()

    def worker(t: int, calls: int, churning: bool) -> None:
        r = np.random.default_rng(t)
        try:
            for _ in range(calls):
                op = r.random()
                if churning and op < 0.15:
                    name = f"p{r.integers(3)}"
                    if op < 0.1:
                        session.load_adapter(name, churn[name])
                        with lock:
                            stats["loads"] += 1
                    else:
                        try:
                            session.unload_adapter(name)
                        except ShiraInputError as exc:  # another thread unloaded it first
                            assert "not loaded" in str(exc), exc
                    continue
                j = int(r.integers(len(specs)))
                i, adapter = specs[j]
                try:
                    got = session.run(inputs[i], adapter=adapter, output_names=["logits"])["logits"]
                except ShiraInputError as exc:
                    if j not in uses_churn or "not loaded" not in str(exc):
                        raise
                    with lock:
                        stats["refused"] += 1
                    continue
                err = float(np.abs(got - reference[j]).max())
                assert err <= 1e-5, f"thread {t}: spec {specs[j]} differs from its reference by {err}"
                with lock:
                    stats["ok"] += 1
        except BaseException as exc:  # collected: the test fails with it below
            errors.append(exc)

    def run_threads(calls: int, churning: bool) -> None:
        threads = [threading.Thread(target=worker, args=(t, calls, churning)) for t in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]

    run_threads(30, churning=False)  # every shape in every thread: onnxruntime's arenas at their working size
    start = rss()
    tracemalloc.start()  # numpy's buffers (the adapters' arrays, stacked feeds) are traced
    traced = tracemalloc.get_traced_memory()[0]
    run_threads(200, churning=True)
    for name in churn:
        if name in session.adapters:
            session.unload_adapter(name)
    gc.collect()
    traced_end = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    end = rss()
    assert stats["ok"] > 16 * 200 * 0.4 and stats["loads"] > 200 and stats["refused"] > 0, stats
    loaded_bytes = stats["loads"] * churn["p0"].stat().st_size  # > 200 x 0.5 MB
    # What the session holds is back to where it was: no unloaded adapter's arrays and no
    # stacked feeds of one survive (each load allocates its arrays anew, > 100 MB in all).
    assert traced_end - traced < 2**20, (traced, traced_end, stats)
    assert all(n not in churn for k in session._mixed._items for n in k)
    # The resident set, up to the allocators' slack: glibc's per-thread arenas of 16 threads
    # and onnxruntime's arena keep some freed memory mapped (measured on 2 cores: +10 to +45 MB,
    # growing far slower than the loads); keeping the loaded adapters would add all of them.
    assert end - start < loaded_bytes / 2, (start, end, loaded_bytes, stats)
