"""Every causal-LM export folder runs in onnxruntime-genai: greedy tokens from genai equal
ours (`ShiraORTModelForCausalLM`) for the base and every adapter, batch 1 and a padded
batch of 2, fp32 and int4, with adapters switched between generators and between calls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai")
from sparse_models import make_adapters, make_base  # noqa: E402

from shira_export.errors import ShiraInputError  # noqa: E402
from shira_export.export.genai_config import genai_config, write_genai_config  # noqa: E402
from shira_export.runtime import ShiraORTModelForCausalLM  # noqa: E402

NEW = 8
PROMPTS = np.array([[5, 17, 33, 8, 41], [9, 60, 3, 0, 0]], np.int64)  # row 1 has 3 real tokens
LENGTHS = [5, 3]


def _export(root: Path, arch: str, quantize):
    from shira_export.pipeline import export_sparse

    base = make_base(arch, root)
    adapters = make_adapters(arch, base, root)
    out = root / "out"
    export_sparse(base, adapters, out, verify=False, quantize=quantize)
    return out, list(adapters)


@pytest.fixture(
    scope="module",
    params=[("llama", None), ("llama", "int4"), ("opt", None)],
    ids=["llama-fp32", "llama-int4", "opt-fp32"],
)
def folder(request, tmp_path_factory):
    arch, quantize = request.param
    out, names = _export(tmp_path_factory.mktemp(f"{arch}_{quantize}"), arch, quantize)
    path = write_genai_config(out)
    assert path == out / "genai_config.json"
    return out, names


def _genai_tokens(opened, name, prompts, lengths) -> np.ndarray:
    """Greedy tokens from genai; a batch is padded on the right with pad_token_id (genai's
    convention: it masks pad tokens and continues each row after its own last token)."""
    from shira_export.runtime.genai import genai_greedy

    model, adapters, pad = opened
    rows = [list(row[:n]) for row, n in zip(prompts, lengths)]
    return genai_greedy(model, rows, NEW, adapter=name, adapters=adapters, pad_token_id=pad)


def _open(out: Path, names):
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    for n in names:
        adapters.load(str(out / "adapters" / f"{n}.onnx_adapter"), n)
    return model, adapters, json.loads((out / "genai_config.json").read_text())["model"]["pad_token_id"]


def _left_padded(prompts, lengths) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask) in transformers' convention: rows padded on the left."""
    width = max(lengths)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, (row, n) in enumerate(zip(prompts, lengths)):
        ids[i, width - n :] = row[:n]
        mask[i, width - n :] = 1
    return ids, mask


def _ours(lm, name, prompts, lengths) -> np.ndarray:
    """Ours, transformers' convention: left padding with an attention mask."""
    ids, mask = _left_padded(prompts, lengths)
    out = lm.generate(ids, mask, adapter=name, max_new_tokens=NEW, min_new_tokens=NEW)
    return out.numpy()[:, ids.shape[1] :]


def test_config_reads_the_graph(folder):
    out, _ = folder
    cfg = json.loads((out / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert cfg["model"]["type"] == "decoder"
    assert cfg["search"]["past_present_share_buffer"] is False
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert dec["num_hidden_layers"] == 2 and dec["hidden_size"] == 32 and dec["head_size"] == 8
    assert cfg["model"]["vocab_size"] == 100


def test_greedy_equals_ours_every_adapter_batch_1_and_padded_2(folder):
    out, names = folder
    opened = _open(out, names)
    lm = ShiraORTModelForCausalLM(out)
    for name in [None, *names]:
        ours_1 = _ours(lm, name, PROMPTS[:1], LENGTHS[:1])
        np.testing.assert_array_equal(_genai_tokens(opened, name, PROMPTS[:1], LENGTHS[:1]), ours_1)
        ours_2 = _ours(lm, name, PROMPTS, LENGTHS)
        np.testing.assert_array_equal(ours_2[:1], ours_1)  # padding does not change row 0
        np.testing.assert_array_equal(_genai_tokens(opened, name, PROMPTS, LENGTHS), ours_2)
    # the adapters really differ from the base (else the test could not fail)
    assert not np.array_equal(_ours(lm, names[0], PROMPTS[:1], LENGTHS[:1]), _ours(lm, None, PROMPTS[:1], LENGTHS[:1]))


def test_adapters_switch_between_generators_and_calls(folder):
    """Adapters loaded once; two generators alive at once with different adapters, stepped in
    turn; then calls in a different order: every result equals a fresh run of that adapter."""
    out, names = folder
    opened = _open(out, names)
    model, adapters, _ = opened
    lm = ShiraORTModelForCausalLM(out)
    want = {n: _ours(lm, n, PROMPTS[:1], LENGTHS[:1])[0] for n in [None, *names]}
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=5 + NEW, min_length=5 + NEW, do_sample=False)
    gens = {}
    for n in names[:2]:
        gens[n] = og.Generator(model, params)
        gens[n].set_active_adapter(adapters, n)
        gens[n].append_tokens(PROMPTS[:1])
    while not all(g.is_done() for g in gens.values()):
        for g in gens.values():
            g.generate_next_token()
    for n, g in gens.items():
        np.testing.assert_array_equal(np.asarray(g.get_sequence(0))[5:], want[n])
    for n in [names[-1], None, names[0], None, names[-1]]:
        np.testing.assert_array_equal(_genai_tokens(opened, n, PROMPTS[:1], LENGTHS[:1])[0], want[n])
    with pytest.raises(Exception, match="in use"):
        adapters.unload(names[0])  # gens[names[0]] still holds it


def test_non_decoder_folders_and_bad_input(tmp_path):
    with pytest.raises(ShiraInputError, match="config.json"):
        genai_config(tmp_path)
    # an encoder graph has no KV cache: no genai config, nothing written
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("last_hidden_state", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["last_hidden_state"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4, "num_attention_heads": 1}))
    assert write_genai_config(tmp_path) is None
    assert not (tmp_path / "genai_config.json").exists()


@pytest.fixture(
    scope="module",
    params=[("fp16", None), ("fp32", "int8"), ("fp32", "int4")],
    ids=["merged-fp16", "merged-int8", "merged-int4"],
)
def merged_folder(request, tmp_path_factory):
    from shira_export.pipeline import export_merged

    dtype, quantize = request.param
    root = tmp_path_factory.mktemp(f"merged_{dtype}_{quantize}")
    base = make_base("llama", root)
    adapter = make_adapters("llama", base, root)["a"]
    out = root / "out"
    export_merged(base, adapter, out, format="onnx", dtype=dtype, quantize=quantize, verify=False)
    assert write_genai_config(out) == out / "genai_config.json"
    return out


def test_merged_folders_run_in_genai_like_onnxruntime(merged_folder):
    """Merged folders (fp16, int8, int4): genai's greedy tokens equal plain onnxruntime's on
    the same graph (runtime.genai's loop; and optimum's ORTModelForCausalLM where it is
    installed), batch 1 and a padded batch of 2."""
    from shira_export.runtime.genai import GenaiGraphRunner

    out = merged_folder
    runner = GenaiGraphRunner(out)
    try:
        from optimum.onnxruntime import ORTModelForCausalLM

        ort_model = ORTModelForCausalLM.from_pretrained(out, use_cache=True, use_io_binding=False)
    except ImportError:
        ort_model = None
    opened = (og.Model(str(out)), None, json.loads((out / "genai_config.json").read_text())["model"]["pad_token_id"])
    for prompts, lengths in ((PROMPTS[:1], LENGTHS[:1]), (PROMPTS, LENGTHS)):
        ids, mask = _left_padded(prompts, lengths)
        width = ids.shape[1]
        want = runner.greedy(ids, mask, NEW)
        np.testing.assert_array_equal(_genai_tokens(opened, None, prompts, lengths), want)
        if ort_model is not None:
            import torch

            theirs = ort_model.generate(
                input_ids=torch.as_tensor(ids),
                attention_mask=torch.as_tensor(mask),
                do_sample=False,
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                pad_token_id=0,
            )[:, width:].numpy()
            np.testing.assert_array_equal(theirs, want)
