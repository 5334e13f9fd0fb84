"""The on-disk contract (shira_export.artifacts): one manifest reader/writer for every kind of
folder, the merged base fingerprint, the task table the CLI and the stages read."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_models import make_adapter, make_base, tiny_model  # noqa: E402

from shira_export.artifacts.manifest import (  # noqa: E402
    MANIFEST_NAME,
    SCHEMA_VERSION,
    AdapterEntry,
    MergedManifest,
    SparseManifest,
    read_manifest,
    read_sparse_manifest,
    weights_fingerprint,
)
from shira_export.artifacts.naming import TargetSite  # noqa: E402
from shira_export.artifacts.tasks import TASKS, Task, graph_feeds, is_label_head, spec_for, task_choices  # noqa: E402
from shira_export.errors import ShiraInputError  # noqa: E402


def test_merged_manifest_round_trip_keeps_later_stages_keys(tmp_path):
    written = MergedManifest(
        tmp_path,
        "text-generation-with-past",
        "onnx",
        "fp32",
        "torch",
        "0.1.0",
        "/base",
        "ab" * 32,
        {"name": "a", "source": "/a"},
        {"quantization": "int8", "quantization_details": {"k": 1}},
    )
    written.write()
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert (raw["schema"], raw["kind"], raw["base_fingerprint"], raw["quantization"]) == (
        SCHEMA_VERSION,
        "merged",
        "ab" * 32,
        "int8",
    )
    read = read_manifest(tmp_path)
    assert isinstance(read, MergedManifest) and read == written and read.raw == raw
    assert read.quantization == "int8" and read.adapter_entries == (AdapterEntry("a", "/a"),)
    (tmp_path / "copy").mkdir()
    read.write(tmp_path / "copy")  # a rewrite elsewhere writes the same JSON
    assert json.loads((tmp_path / "copy" / MANIFEST_NAME).read_text()) == raw


def test_a_merged_manifest_of_an_older_version_still_reads(tmp_path):
    old = {"schema": 1, "kind": "merged", "format": "safetensors", "task": "text-classification", "adapter": None}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(old))
    read = read_manifest(tmp_path)
    assert isinstance(read, MergedManifest)
    assert (read.base_fingerprint, read.dtype, read.exporter) == (None, "fp32", None)
    assert read.adapter_entries == (AdapterEntry("base", None),)


def test_sparse_manifest_round_trip_and_refusals(tmp_path):
    site = TargetSite("m.q", "node", "init", 4, 3, False, "d" * 40)
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "a.onnx_adapter").write_bytes(b"x")
    written = SparseManifest(
        tmp_path,
        "feature-extraction",
        "f" * 64,
        [site],
        {"a": {"file": "adapters/a.onnx_adapter", "source": "/a", "nnz": 1}},
        extra={"exporter": "torch"},
    )
    written.write()
    read = read_manifest(tmp_path)
    assert isinstance(read, SparseManifest) and read == written and read.exporter == "torch"
    assert read_sparse_manifest(tmp_path) == written
    assert read.adapter_entries == (AdapterEntry("a", "/a", "adapters/a.onnx_adapter"),)
    (tmp_path / "adapters" / "a.onnx_adapter").unlink()
    with pytest.raises(ShiraInputError, match=r"adapters.a.file 'adapters/a.onnx_adapter' not found"):
        read_manifest(tmp_path)
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    for key, value, message in (
        ("schema", 2, "key 'schema' expected 1, found 2"),
        ("kind", "dense", "key 'kind' expected one of"),
        ("quantization", "int3", "key 'quantization' expected 'int8' or 'int4'"),
    ):
        (tmp_path / MANIFEST_NAME).write_text(json.dumps(dict(raw, **{key: value})))
        with pytest.raises(ShiraInputError, match=message):
            read_manifest(tmp_path)


def test_weights_fingerprint_covers_every_weight_and_nothing_else():
    model = tiny_model("opt").eval()
    first = weights_fingerprint(model)
    assert first == weights_fingerprint(tiny_model("opt").eval())  # same seed, same weights
    with torch.no_grad():
        weight = model.get_submodule("model.decoder.layers.1.fc2").weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))  # one ulp
    assert weights_fingerprint(model) != first
    assert len(first) == 64 and int(first, 16) >= 0


def test_merged_export_records_the_base_fingerprint(tmp_path):
    from shira_export.artifacts.hf_folder import load_base_model
    from shira_export.pipeline import export_merged

    base = make_base("opt", tmp_path)
    adapter = make_adapter("opt", base, tmp_path, "a", seed=1, r=2, target_modules=["q_proj"])
    result = export_merged(base, adapter, tmp_path / "out", format="safetensors", verify=False)
    manifest = read_manifest(result.output_dir)
    assert isinstance(manifest, MergedManifest) and manifest.task == "text-generation-with-past"
    assert manifest.base_fingerprint == weights_fingerprint(load_base_model(base, Task.TEXT_GENERATION_WITH_PAST))
    # the merged weights differ from the base's: the fingerprint is the base's, not the folder's
    assert manifest.base_fingerprint != weights_fingerprint(load_base_model(result.output_dir, manifest.task))


def test_the_task_table_drives_the_cli_choices_and_the_feeds():
    from shira_export._cli import merged, sparse

    assert merged.TASKS == ("auto", *(t.value for t in TASKS)) == task_choices()
    assert sparse.TASKS == tuple(t for t in merged.TASKS if t != "text-generation")
    assert spec_for("causal-lm-with-past") is TASKS[Task.TEXT_GENERATION_WITH_PAST]  # an older manifest's name
    with pytest.raises(ShiraInputError, match="found 'translation'"):
        spec_for("translation")
    assert is_label_head("classifier") and is_label_head("roberta.classifier.out_proj")
    assert not is_label_head("model.layers.0.self_attn.out_proj")
    ids, mask = torch.ones(2, 3, dtype=torch.long).numpy(), torch.tensor([[0, 1, 1], [1, 1, 1]]).numpy()
    feeds = graph_feeds(TASKS[Task.TEXT_GENERATION], ids, mask, {"input_ids", "attention_mask", "position_ids"})
    assert feeds["position_ids"].tolist() == [[0, 0, 1], [0, 1, 2]] and "token_type_ids" not in feeds
    feeds = graph_feeds(TASKS[Task.FEATURE_EXTRACTION], ids, mask, ["input_ids", "attention_mask", "token_type_ids"])
    assert feeds["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]] and "position_ids" not in feeds
