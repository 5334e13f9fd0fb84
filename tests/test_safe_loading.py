"""Model folders are data: nothing in one may make transformers run code (issue: loading
that cannot run code). Pickle-only weights and config fields that select code are refused
with an error naming the file and field; every entry point (export, verify) loads the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shira_export.artifacts.hf_folder import load_config, load_model, read_config_json
from shira_export.cli import main as cli_main
from shira_export.errors import ShiraInputError
from tiny_models import tiny_opt


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("safe") / "base"
    tiny_opt().save_pretrained(path)
    return path


def _copy_with(base: Path, dest: Path, **fields) -> Path:
    dest.mkdir()
    config = json.loads((base / "config.json").read_text())
    config.update(fields)
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    return dest


def test_plain_folder_loads(base):
    from transformers import AutoModelForCausalLM

    model = load_model(base, AutoModelForCausalLM, dtype=torch.float32)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert load_config(base).model_type == "opt"


@pytest.mark.parametrize(
    "field,value",
    [
        ("auto_map", {"AutoModelForCausalLM": "evil.EvilModel"}),
        ("_attn_implementation_internal", "kernels-community/flash-attn"),
        ("attn_implementation", "someone/kernel"),
        ("trust_remote_code", True),
    ],
)
def test_code_selecting_fields_are_refused(base, tmp_path, field, value):
    folder = _copy_with(base, tmp_path / "m", **{field: value})
    with pytest.raises(ShiraInputError, match=rf"config\.json: field '{field}'"):
        load_config(folder)
    from transformers import AutoModelForCausalLM

    with pytest.raises(ShiraInputError, match=rf"field '{field}'"):
        load_model(folder, AutoModelForCausalLM)


def test_builtin_attention_and_nested_fields(base, tmp_path):
    ok = _copy_with(base, tmp_path / "ok", attn_implementation="sdpa")
    read_config_json(ok)
    nested = _copy_with(base, tmp_path / "nested", text_config={"auto_map": {"AutoModel": "x.Y"}})
    with pytest.raises(ShiraInputError, match="field 'auto_map'"):
        read_config_json(nested)
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ShiraInputError, match=r"config\.json: not a readable JSON model config|nested deeper"):
        read_config_json(deep)


def test_pickle_only_weights_are_refused_everywhere(base, tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((base / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    from transformers import AutoModelForCausalLM

    with pytest.raises(ShiraInputError, match=r"safetensors.*found only \['pytorch_model\.bin'\].*never loaded"):
        load_model(folder, AutoModelForCausalLM)
    from shira_export import ShiraConfig, get_shira_model

    get_shira_model(tiny_opt(), ShiraConfig(r=1, init_weights=False)).save_pretrained(tmp_path / "adapter")
    code = cli_main(
        [
            "merged",
            "--model",
            str(folder),
            "--adapter",
            str(tmp_path / "adapter"),
            "--format",
            "safetensors",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and "pytorch_model.bin" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = cli_main(["verify", "--model", str(folder), "--candidate", str(base)])
    assert code == 2
