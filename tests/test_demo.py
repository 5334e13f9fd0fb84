"""The README's main job: `shira-export demo` end to end (short training)."""

from __future__ import annotations

import json

from shira_export.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    code = main(["demo", "--output", str(tmp_path), "--steps", "30"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    parity = json.loads((tmp_path / "onnx" / "parity.json").read_text())
    assert parity["verdict"] == "pass"
    assert (tmp_path / "onnx" / "adapters" / "poet.onnx_adapter").is_file()
    assert (tmp_path / "adapters" / "engineer" / "adapter_model.safetensors").is_file()
    assert "parity vs PyTorch (each adapter merged, and the base): PASS" in printed
    generations = (tmp_path / "demo_generations.txt").read_text()
    assert "poet=" in generations and "engineer=" in generations
    # `shira-export run` on the same folder (it has the tokenizer) gives the demo's greedy text
    assert (
        main(
            [
                "run",
                "--graph",
                str(tmp_path / "onnx"),
                "--adapter",
                "poet",
                "--prompt",
                "the river",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    continuation = capsys.readouterr().out.strip()[len("the river") :].strip()
    assert continuation and f"poet={continuation!r}" in generations.splitlines()[0]


def test_cli_version_and_help(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert "shira-export 0.1.0" in capsys.readouterr().out
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
