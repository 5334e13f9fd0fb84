"""Output handling under faults and races (issue 16, items 2, 4, 8, 13): outputs never
overlap inputs, a publish never replaces what another process published, --overwrite
never touches a user's folder and survives being killed, paths from manifests stay inside
their folder, and a folder lock serializes read-modify-write. No ONNX export needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shira_export import _io
from shira_export.errors import ShiraInputError


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


# --- overlap -----------------------------------------------------------------------------


def test_output_overlapping_an_input_is_refused(tmp_path):
    model = _folder(tmp_path / "model", **{"config.json": "{}"})
    (model / "sub").mkdir()
    for output in (model, model / "sub", model / "new", tmp_path):  # equal, inside (existing / new), containing
        with pytest.raises(ShiraInputError, match="overlaps the input folder"):
            _io.check_output_location(output, [model], overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(ShiraInputError, match="overlaps the input folder"):  # through a symlink
        _io.check_output_location(link, [model], overwrite=True)
    assert _io.check_output_location(tmp_path / "elsewhere", [model]) == tmp_path / "elsewhere"
    assert _tree(model) == {"config.json": "{}"}


def test_output_that_is_or_holds_the_current_folder_is_refused(tmp_path, monkeypatch):
    work = _folder(tmp_path / "work" / "inner")
    monkeypatch.chdir(work)
    for output in (work, tmp_path / "work"):
        with pytest.raises(ShiraInputError, match="current folder"):
            _io.check_output_location(output, overwrite=True)


def test_output_that_is_a_file_or_exists(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ShiraInputError, match="not a folder"):
        _io.check_output_location(tmp_path / "f", overwrite=True)
    (tmp_path / "d").mkdir()
    with pytest.raises(ShiraInputError, match="output folder exists.*--overwrite"):
        _io.check_output_location(tmp_path / "d")


def test_names_too_long_for_the_file_system_are_input_errors(tmp_path):
    name = "模型" * 50  # 100 characters, 300 bytes in UTF-8: over NAME_MAX
    with pytest.raises(ShiraInputError, match="name too long"):
        with _io.atomic_dir(tmp_path / name):
            pass
    with pytest.raises(ShiraInputError, match="name too long"):
        _io.atomic_write_text(tmp_path / name, "x")
    assert list(tmp_path.iterdir()) == []


# --- publish races -----------------------------------------------------------------------


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "mkdir_claim"])
def test_publish_never_replaces_a_folder_another_process_published(tmp_path, monkeypatch, fallback):
    if fallback:  # a kernel or file system without RENAME_NOREPLACE
        monkeypatch.setattr(_io, "_renameat2", lambda src, dst: None)
    out = tmp_path / "out"
    with pytest.raises(ShiraInputError, match="another process created this output"):
        with _io.atomic_dir(out) as tmp:
            (tmp / "model.onnx").write_text("ours")
            _folder(out, **{"model.onnx": "theirs"})  # the other run published first
    assert _tree(out) == {"model.onnx": "theirs"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # our temp folder is gone

    empty = tmp_path / "empty"  # even an empty folder (which a plain rename would replace)
    with pytest.raises(ShiraInputError, match="another process"):
        with _io.atomic_dir(empty) as tmp:
            (tmp / "x").write_text("ours")
            empty.mkdir()
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "link"])
def test_rename_noreplace_for_files(tmp_path, monkeypatch, fallback):
    if fallback:
        monkeypatch.setattr(_io, "_renameat2", lambda src, dst: None)
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        _io.rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "b" and (tmp_path / "a").read_text() == "a"
    _io.rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_text() == "a" and not (tmp_path / "a").exists()


def test_two_threads_publishing_one_new_output_one_wins_one_is_told(tmp_path):
    out = tmp_path / "out"
    barrier = threading.Barrier(2)
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            with _io.atomic_dir(out) as tmp:
                (tmp / "who").write_text(str(i))
                barrier.wait(timeout=30)  # both have built their folder before either publishes
            results[i] = "ok"
        except ShiraInputError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(type(r).__name__ for r in results.values()) == ["ShiraInputError", "str"]
    loser = next(i for i, r in results.items() if r != "ok")
    assert "another process" in str(results[loser])
    assert (out / "who").read_text() == str(1 - loser)  # the winner's output, complete
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- overwrite ---------------------------------------------------------------------------


def test_overwrite_leaves_a_users_sibling_folders_alone(tmp_path):
    out = _folder(tmp_path / "OUT", **{"old.txt": "old"})
    mine = [_folder(tmp_path / n, **{"keep": n}) for n in (".OUT.old", ".OUT.tmp", ".OUT.abc.tmp")]
    with _io.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(out) == {"new.txt": "new"}
    for folder in mine:
        assert _tree(folder) == {"keep": folder.name}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["OUT", ".OUT.old", ".OUT.tmp", ".OUT.abc.tmp"])


_KILLED_OVERWRITE = """
import os, sys
from shira_export import _io
calls = []
real = _io.rename_noreplace
def rename(src, dst):
    calls.append(1)
    if len(calls) == 2:  # killed between moving OUT aside and putting the new one in place
        os._exit(9)
    real(src, dst)
_io.rename_noreplace = rename
with _io.atomic_dir(sys.argv[1], overwrite=True) as tmp:
    (tmp / "new.txt").write_text("new")
"""


def test_an_overwrite_killed_between_its_renames_is_recovered(tmp_path):
    out = _folder(tmp_path / "OUT", **{"old.txt": "old"})
    done = subprocess.run([sys.executable, "-c", _KILLED_OVERWRITE, str(out)], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert not out.exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(n.startswith(".OUT.shira-") for n in left)  # our backup + our temp folder
    assert {n.rsplit(".", 1)[1] for n in left} == {"old", "tmp"}
    # the next run on OUT puts the old folder back and removes the dead run's temp folder
    with pytest.raises(ShiraInputError, match="output folder exists"):
        with _io.atomic_dir(out):
            pass
    assert _tree(out) == {"old.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["OUT"]


def test_debris_of_a_live_run_or_another_user_is_not_touched(tmp_path):
    out = tmp_path / "OUT"
    live = _folder(tmp_path / f".OUT.shira-{_io._host()}-{os.getpid()}-abcd.tmp")  # this very process
    other_host = _folder(tmp_path / ".OUT.shira-00000000-1-abcd.old")
    assert _io.recover_and_clean(out) is None
    assert live.exists() and other_host.exists() and not out.exists()


def test_a_failed_build_leaves_no_output_and_no_debris(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with _io.atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    _folder(out, **{"a": "old"})
    with pytest.raises(KeyboardInterrupt):
        with _io.atomic_dir(out, overwrite=True) as tmp:
            raise KeyboardInterrupt
    assert _tree(out) == {"a": "old"} and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.skipif(os.getuid() == 0, reason="root writes into read-only folders")
def test_read_only_location_is_an_input_error(tmp_path):
    ro = _folder(tmp_path / "ro")
    os.chmod(ro, 0o555)
    try:
        with pytest.raises(ShiraInputError, match="not writable"):
            with _io.atomic_dir(ro / "out"):
                pass
    finally:
        os.chmod(ro, 0o755)


# --- confined paths and the folder lock ----------------------------------------------------


def test_paths_from_a_manifest_stay_inside_the_folder(tmp_path):
    folder = _folder(tmp_path / "graph")
    (tmp_path / "secret").write_text("x")
    (folder / "adapters").mkdir()
    (folder / "adapters" / "out").symlink_to(tmp_path)
    for rel in ("../secret", "/etc/passwd", "adapters/../../secret", "adapters/out/secret", "", None, 3):
        with pytest.raises(ShiraInputError, match=r"leaves the folder|outside|expected a relative path"):
            _io.confined(folder, rel, what="adapters.a.file")
    assert _io.confined(folder, "adapters/a.onnx_adapter", what="x") == folder / "adapters" / "a.onnx_adapter"


def test_folder_lock_serializes_read_modify_write(tmp_path):
    path = tmp_path / "counter.json"
    path.write_text(json.dumps({"names": []}))
    errors: list[BaseException] = []

    def add(name: str) -> None:
        try:
            with _io.folder_lock(tmp_path):
                data = json.loads(path.read_text())
                threading.Event().wait(0.02)  # widen the window a lost update needs
                data["names"].append(name)
                _io.atomic_write_text(path, json.dumps(data))
        except BaseException as exc:  # noqa: BLE001  (re-raised below: a worker's error fails the test)
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(f"a{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(json.loads(path.read_text())["names"]) == sorted(f"a{i}" for i in range(8))


def test_folder_lock_gives_up_with_an_input_error(tmp_path):
    import fcntl

    fd = os.open(tmp_path / _io.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ShiraInputError, match="locked by another shira-export process"):
            with _io.folder_lock(tmp_path, timeout=0.1):
                pass
    finally:
        os.close(fd)


def test_describe_path():
    assert _io.describe_path("/", want="file") == "is a folder, expected a file"
    assert _io.describe_path("/nope-nope", want="folder") == "not found"
    assert _io.describe_path(__file__, want="folder") == "is a file, expected a folder"


def test_overwrite_of_a_symlinked_output_keeps_the_link_target(tmp_path):
    target = _folder(tmp_path / "real", **{"a": "old"})
    out = tmp_path / "out"
    out.symlink_to(target)
    with _io.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("new")
    assert not out.is_symlink() and _tree(out) == {"b": "new"}
    assert _tree(target) == {"a": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]


def test_temp_files_of_a_killed_writer_are_cleaned_on_the_next_write(tmp_path):
    dead = tmp_path / f".f.json.shira-{_io._host()}-999999999-abcd.tmp"  # no such process
    dead.write_text("half")
    _io.atomic_write_text(tmp_path / "f.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
