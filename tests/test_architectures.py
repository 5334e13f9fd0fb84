"""Every architecture the exporters promise, on the installed transformers: a tiny model of
each, one SHiRA adapter, exported merged and sparse with the default exporter and verified
against PyTorch by `verify` (untraced shapes, greedy tokens with the KV cache). The same
rows, with timings and figures: `python tools/arch_matrix.py`."""

from __future__ import annotations

import json

import pytest

from shira_export import ShiraConfig, get_shira_model
from shira_export.pipeline import export_merged, export_sparse
from tiny_archs import ARCHS, available, build

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_merged_and_sparse_match_pytorch(arch, tmp_path):
    if not available(arch):
        import transformers

        pytest.skip(
            f"{ARCHS[arch].config} is not in transformers {transformers.__version__} (needs >= {ARCHS[arch].since})"
        )
    spec = ARCHS[arch]
    model = build(arch)
    model.save_pretrained(tmp_path / "base")
    get_shira_model(
        model,
        ShiraConfig(r=2, target_modules=spec.targets, init_weights=False, random_seed=3, task_type=spec.peft_task),
    ).save_pretrained(tmp_path / "adapter")

    merged = export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert merged.report.passed
    sparse_adapter = tmp_path / "adapter"
    if spec.peft_task == "SEQ_CLS":  # its head (modules_to_save) ships merged only; sparse: encoder only
        model = build(arch)
        sparse_adapter = tmp_path / "adapter-encoder"
        get_shira_model(
            model, ShiraConfig(r=2, target_modules=spec.targets, init_weights=False, random_seed=4)
        ).save_pretrained(sparse_adapter)
    sparse = export_sparse(tmp_path / "base", {"a": sparse_adapter}, tmp_path / "sparse", task=spec.task)
    assert sparse.report.passed
    manifest = json.loads((tmp_path / "sparse" / "shira_export.json").read_text())
    assert manifest["exporter"] == merged.exporter.value
    assert {t["module"].rsplit(".", 1)[-1] for t in manifest["targets"]} <= set(spec.targets)
    worst = max(r.value for r in sparse.report.records if r.metric == "max_abs" and r.value is not None)
    assert worst <= 1e-4
    if spec.peft_task == "CAUSAL_LM":  # the KV cache: greedy tokens equal PyTorch's
        greedy = [r.value for r in sparse.report.records if r.metric.startswith("greedy_prefix")]
        assert greedy and min(greedy) == 1.0


def test_a_cache_that_is_not_a_kv_cache_is_refused_by_name(tmp_path):
    """Qwen3.5's linear-attention layers keep a recurrent state, not keys and values: the
    torch route says so (an input error naming the layer type), not an IndexError."""
    import transformers

    from shira_export.errors import ShiraInputError
    from shira_export.export.exporters.torch_export import export_with_torch

    if not hasattr(transformers, "Qwen3_5TextConfig"):
        pytest.skip(f"no Qwen3.5 in transformers {transformers.__version__}")
    config = transformers.Qwen3_5TextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        head_dim=8,
        layer_types=["linear_attention", "full_attention"],
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ShiraInputError, match="qwen3_5_text.*LinearAttentionLayer.*text-generation"):
        export_with_torch(model, tmp_path, task="text-generation-with-past")
