"""The CLI's exit-code contract under bad input (issue 16, items 11 and 12; issue 12, item
6): input errors exit 2 with a one-line message and no traceback, bugs exit 3 with one,
Ctrl-C exits 130, and `--help` / `--version` do not import torch. Nothing here exports
ONNX (merged safetensors exports and checks that run before any export)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shira_export import ShiraConfig, get_shira_model
from shira_export.cli import main
from shira_export.errors import ParityFailure, ShiraInputError
from tiny_models import tiny_opt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny OPT base folder (128 positions) and one adapter folder."""
    root = tmp_path_factory.mktemp("cli")
    tiny_opt().save_pretrained(root / "base")
    get_shira_model(tiny_opt(), ShiraConfig(r=2, init_weights=False, task_type="CAUSAL_LM")).save_pretrained(root / "a")
    return root


def _copy_adapter(src: Path, dst: Path, edit=None, config=None) -> Path:
    dst.mkdir()
    tensors = load_file(src / "adapter_model.safetensors")
    if edit is not None:
        edit(tensors)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, dst / "adapter_model.safetensors", metadata={"format": "pt"}
    )
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def _cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def _input_error(args, capsys, *fragments: str) -> str:
    code, err = _cli(args, capsys)
    assert code == 2, err
    last = err.strip().splitlines()[-1].split("\r")[-1].strip()  # progress bars may come first
    assert "Traceback" not in err and "shira-export: error: " in last, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _merged(tiny, out, *extra):
    return [
        "merged",
        "--model",
        tiny / "base",
        "--adapter",
        tiny / "a",
        "--format",
        "safetensors",
        "--output",
        out,
        *extra,
    ]


# --- the contract itself -------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc, code",
    [
        (ShiraInputError("bad input"), 2),
        (OSError(errno.ENOSPC, "No space left on device", "/out/x"), 2),
        (OSError(errno.EROFS, "Read-only file system", "/out"), 2),
        (OSError(errno.ENAMETOOLONG, "File name too long", "/out/x"), 2),
        (FileNotFoundError("/x: not found"), 2),
        (ParityFailure("logits differ"), 1),
        (KeyboardInterrupt(), 130),
        (ValueError("a bug"), 3),
        (TypeError("a bug"), 3),
        (KeyError("a bug"), 3),
        (RecursionError("a bug"), 3),
        (OSError(errno.EIO, "I/O error"), 3),
    ],
)
def test_exit_codes(exc, code, capsys, monkeypatch):
    import shira_export._cli.verify as verify_cli

    def boom(args):
        raise exc

    monkeypatch.setattr(verify_cli, "_run", boom)
    got, err = _cli(["verify", "--model", "m", "--candidate", "c"], capsys)
    assert got == code, err
    assert ("Traceback" in err) == (code == 3), err
    if code == 3:
        assert "internal error" in err


def test_help_and_version_do_not_import_torch():
    for flag in ("--help", "--version"):
        script = (
            "import sys\nfrom shira_export.cli import main\ntry:\n    main([%r])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'onnx' in sys.modules)" % flag
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        assert done.stdout.strip().splitlines()[-1] == "False False", done.stdout


def test_help_lists_the_exit_codes():
    done = subprocess.run([sys.executable, "-m", "shira_export.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "3 internal error" in " ".join(done.stdout.split())


_INTERRUPTED_IMPORT = """
import builtins, sys
real = builtins.__import__
def imp(name, *a, **k):
    if name.startswith("torch") or name.startswith("transformers"):
        raise KeyboardInterrupt  # Ctrl-C while the handler imports the heavy stack
    return real(name, *a, **k)
builtins.__import__ = imp
from shira_export.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_import_exits_130_without_a_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _INTERRUPTED_IMPORT,
            "merged",
            "--model",
            str(tmp_path),
            "--adapter",
            str(tmp_path),
            "--format",
            "onnx",
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "interrupted" in done.stderr


def test_verify_profile_choices_match_the_profiles():
    from shira_export._cli.verify import PROFILES
    from shira_export.verify.profiles import Precision

    assert PROFILES == tuple(p.value for p in Precision)


# --- input errors that used to exit 3 or 1 -------------------------------------------------


def test_opset_out_of_range(tiny, tmp_path, capsys):
    _input_error(
        [
            "merged",
            "--model",
            tiny / "base",
            "--adapter",
            tiny / "a",
            "--format",
            "onnx",
            "--output",
            tmp_path / "o",
            "--opset",
            "99",
        ],
        capsys,
        "opset",
        "99",
    )
    _input_error(
        ["sparse", "--model", tiny / "base", "--adapter", tiny / "a", "--output", tmp_path / "o", "--opset", "99"],
        capsys,
        "opset",
    )
    assert not (tmp_path / "o").exists()


def test_adapter_name_that_does_not_exist(tiny, tmp_path, capsys):
    err = _input_error(_merged(tiny, tmp_path / "o", "--adapter-name", "nope"), capsys, "'nope'", "['default']")
    assert "available" in err and not (tmp_path / "o").exists()


def test_float8_values(tiny, tmp_path, capsys):
    def to_f8(t):
        for k in [k for k in t if k.endswith(".shira_weight")][:1]:
            t[k] = t[k].to(torch.float8_e4m3fn)

    bad = _copy_adapter(tiny / "a", tmp_path / "f8", edit=to_f8)
    _input_error(
        ["merged", "--model", tiny / "base", "--adapter", bad, "--format", "safetensors", "--output", tmp_path / "o"],
        capsys,
        "float8",
        str(bad),
    )


def test_config_nested_deeply_or_random_bytes(tiny, tmp_path, capsys):
    deep = _copy_adapter(tiny / "a", tmp_path / "deep")
    (deep / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    _input_error(
        ["merged", "--model", tiny / "base", "--adapter", deep, "--format", "safetensors", "--output", tmp_path / "o"],
        capsys,
        str(deep / "adapter_config.json"),
    )
    noise = _copy_adapter(tiny / "a", tmp_path / "noise")
    (noise / "adapter_config.json").write_bytes(bytes(range(256)) * 4)
    _input_error(
        ["merged", "--model", tiny / "base", "--adapter", noise, "--format", "safetensors", "--output", tmp_path / "o"],
        capsys,
        str(noise / "adapter_config.json"),
    )


def test_not_found_and_is_a_folder_are_told_apart(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _input_error(
        [
            "merged",
            "--model",
            tiny / "base",
            "--adapter",
            tmp_path / "file",
            "--format",
            "safetensors",
            "--output",
            tmp_path / "o",
        ],
        capsys,
        "is a file, expected a folder",
    )
    _input_error(
        [
            "merged",
            "--model",
            tiny / "base",
            "--adapter",
            tmp_path / "missing",
            "--format",
            "safetensors",
            "--output",
            tmp_path / "o",
        ],
        capsys,
        "not found",
    )


def test_classification_on_a_causal_base(tiny, tmp_path, capsys):
    _input_error(_merged(tiny, tmp_path / "o", "--task", "text-classification"), capsys, "text-classification")
    seq_cls = _copy_adapter(tiny / "a", tmp_path / "seq", config={"task_type": "SEQ_CLS"})
    _input_error(
        [
            "merged",
            "--model",
            tiny / "base",
            "--adapter",
            seq_cls,
            "--format",
            "safetensors",
            "--output",
            tmp_path / "o",
        ],
        capsys,
        "text-classification",
    )
    assert not (tmp_path / "o").exists()


def test_values_that_overflow_the_reference(tiny, tmp_path, capsys):
    def huge(t):
        for k in t:
            if k.endswith(".shira_weight"):
                t[k] = torch.full_like(t[k], 3e38)

    bad = _copy_adapter(tiny / "a", tmp_path / "huge", edit=huge)
    _input_error(
        ["merged", "--model", tiny / "base", "--adapter", bad, "--format", "safetensors", "--output", tmp_path / "o"],
        capsys,
        "NaN/Inf",
        "overflows",
    )
    assert not (tmp_path / "o").exists()


def test_output_names_too_long(tiny, tmp_path, capsys):
    _input_error(_merged(tiny, tmp_path / ("模型" * 50)), capsys, "name too long")
    _input_error(
        ["sparse", "--model", tiny / "base", "--adapter", f"{'模型' * 50}={tiny / 'a'}", "--output", tmp_path / "o"],
        capsys,
        "bytes",
    )


def test_reserved_adapter_name(tiny, tmp_path, capsys):
    _input_error(
        ["sparse", "--model", tiny / "base", "--adapter", f"base={tiny / 'a'}", "--output", tmp_path / "o"],
        capsys,
        "reserved",
    )


def test_output_overlapping_an_input(tiny, tmp_path, capsys):
    before = sorted(p.name for p in (tiny / "a").iterdir())
    for out in (tiny / "a", tiny / "base", tiny / "base" / "inside"):
        _input_error(_merged(tiny, out, "--overwrite"), capsys, "overlaps the input folder")
        _input_error(
            ["sparse", "--model", tiny / "base", "--adapter", tiny / "a", "--output", out, "--overwrite"],
            capsys,
            "overlaps the input folder",
        )
    assert sorted(p.name for p in (tiny / "a").iterdir()) == before
    assert not (tiny / "base" / "inside").exists()


def test_disk_full_or_read_only_output(tiny, tmp_path, capsys, monkeypatch):
    real = Path.write_text

    def full(self, *a, **k):
        if self.name == "shira_export.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    _input_error(_merged(tiny, tmp_path / "o", "--no-verify"), capsys, "No space left on device")
    assert list(tmp_path.iterdir()) == []  # no partial output, no temp folder
    monkeypatch.undo()
    _input_error(_merged(tiny, Path("/proc/shira_export_test/out"), "--no-verify"), capsys, "/proc")


def test_verify_greedy_tokens_past_the_positions_and_binary_inputs(tiny, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main([str(a) for a in _merged(tiny, out, "--no-verify")]) == 0
    capsys.readouterr()
    base = ["verify", "--model", tiny / "base", "--candidate", out, "--quiet"]
    _input_error(base + ["--set", "greedy_tokens=400"], capsys, "greedy_tokens=400", "128 positions")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00binary" * 10)
    _input_error(base + ["--inputs", tmp_path / "bin.txt"], capsys, str(tmp_path / "bin.txt"), "not UTF-8")
    _input_error(base + ["--inputs", tmp_path], capsys, "is a folder, expected a file")


def test_run_refuses_an_empty_prompt_before_loading(tmp_path, capsys):
    _input_error(["run", "--graph", tmp_path, "--prompt", ""], capsys, "--prompt: empty")
    _input_error(["run", "--graph", tmp_path, "--prompt", "hi", "--max-new-tokens", "0"], capsys, "--max-new-tokens")


def test_demo_with_bad_steps_writes_nothing(tmp_path, capsys):
    _input_error(["demo", "--steps", "-3", "--output", tmp_path / "d"], capsys, "--steps")
    assert not (tmp_path / "d").exists()
    from shira_export.demo import run_demo

    with pytest.raises(ShiraInputError, match="steps"):
        run_demo(tmp_path / "d", steps=-3)
    assert not (tmp_path / "d").exists()


_RACER = """
import sys, time
from pathlib import Path
from shira_export import _io
from shira_export.cli import main
sync, me = Path(sys.argv[1]), sys.argv[2]
real = _io._publish
def publish(tmp, path, overwrite):
    (sync / f"ready-{me}").touch()  # this run's folder is built
    while not (sync / "go").exists():  # wait for the other run's
        time.sleep(0.01)
    return real(tmp, path, overwrite)
_io._publish = publish
sys.exit(main(sys.argv[3:]))
"""


def test_two_merged_runs_to_one_new_output_one_wins_one_exits_2(tiny, tmp_path):
    """Two processes build their folder before either publishes: the second must not
    replace the first's output (it used to, and both exited 0)."""
    import time

    sync, work = tmp_path / "sync", tmp_path / "work"
    sync.mkdir()
    work.mkdir()
    out = work / "out"
    args = [str(a) for a in _merged(tiny, out, "--no-verify")]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(sync), str(i), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    while len(list(sync.glob("ready-*"))) < 2 and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    (sync / "go").touch()
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another process created this output" in loser and "Traceback" not in loser
    manifest = json.loads((out / "shira_export.json").read_text())
    assert manifest["kind"] == "merged" and (out / "model.safetensors").is_file()
    assert [p.name for p in work.iterdir()] == ["out"]  # the loser left no temp folder
