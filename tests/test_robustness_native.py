"""The native-kernel cache cannot be used to run someone else's code in our process
(issue 16, item 1): private folders, ownership and write-permission checks, and the
sha256 recorded at build time."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from shira_export import _native

pytestmark = pytest.mark.skipif(_native._compiler() is None or os.name == "nt", reason="needs a C compiler (POSIX)")

_PLANT = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w"); if (f) { fputs("ran", f); fclose(f); }
}
"""


def _plant(path: Path, marker: Path, tmp_path: Path) -> None:
    """A shared library that, if ever loaded, writes `marker`."""
    src = tmp_path / "plant.c"
    src.write_text(_PLANT)
    cc = _native._compiler()
    subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(path), str(src)], check=True)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The loader with its cache in tmp_path/cache and the temp dir at tmp_path/tmp."""
    monkeypatch.setenv("SHIRA_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    os.chmod(tmp_path / "tmp", 0o1777)  # like /tmp: shared and sticky
    _native._reset_for_tests()
    yield tmp_path
    monkeypatch.undo()
    _native._reset_for_tests()


def _works() -> None:
    weight, flat, values = torch.zeros(10), torch.tensor([3, 7]), torch.tensor([1.5, -2.0])
    _native.scatter_(weight, flat, values)
    assert weight[3].item() == 1.5 and weight[7].item() == -2.0 and weight.abs().sum().item() == 3.5


def test_a_new_cache_folder_is_private_and_the_library_recorded(fresh):
    assert _native.loaded(), _native.status()
    cache = fresh / "cache"
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    (lib,) = cache.glob("kernels-*.so")
    assert stat.S_IMODE(os.stat(lib).st_mode) & 0o022 == 0
    import hashlib

    assert (cache / (lib.name + ".sha256")).read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()
    assert _native.status() == f"loaded from {lib}"
    _works()


def test_a_planted_library_without_our_record_is_rebuilt_not_loaded(fresh):
    cache = fresh / "cache"
    cache.mkdir(mode=0o700)
    target = cache / _native._library_name(_native._compiler())
    marker = fresh / "planted_code_ran"
    _plant(target, marker, fresh)
    (cache / (target.name + ".sha256")).write_text("0" * 64 + "\n")  # a record that does not match
    assert _native.loaded(), _native.status()
    assert not marker.exists()  # the planted constructor never ran
    _works()
    assert b"planted" not in target.read_bytes()  # replaced by our own build


def test_a_library_changed_after_the_build_is_not_loaded(fresh):
    assert _native.loaded()
    (lib,) = (fresh / "cache").glob("kernels-*.so")
    marker = fresh / "planted_code_ran"
    _plant(lib, marker, fresh)  # same name, our record of the original left in place
    _native._reset_for_tests()
    assert _native.loaded(), _native.status()
    assert not marker.exists()
    _works()


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_cache_folder_others_can_write_is_not_used(fresh, mode):
    cache = fresh / "cache"
    cache.mkdir()
    os.chmod(cache, mode)
    assert _native.loaded(), _native.status()
    assert not list(cache.glob("kernels-*"))
    own = fresh / "tmp" / f"shira_export-{os.getuid()}"
    assert list(own.glob("kernels-*.so")) and stat.S_IMODE(os.stat(own).st_mode) == 0o700
    _works()


def test_temp_fallback_prepared_by_another_user_is_refused(fresh):
    """The home cache cannot be used; the per-user temp folder was created by someone else
    (here: group/other writable, and owned by another uid when we are root) with a planted
    library: a fresh private folder is used instead and the plant never runs."""
    (fresh / "a_file").write_text("not a folder")
    os.environ["SHIRA_EXPORT_CACHE"] = str(fresh / "a_file" / "cache")
    shared = fresh / "tmp" / f"shira_export-{os.getuid()}"
    shared.mkdir()
    marker = fresh / "planted_code_ran"
    target = shared / _native._library_name(_native._compiler())
    _plant(target, marker, fresh)
    os.chmod(target, 0o777)
    os.chmod(shared, 0o777)
    if os.getuid() == 0:
        os.chown(shared, 12345, 12345)
        os.chown(target, 12345, 12345)
    assert _native.loaded(), _native.status()
    assert not marker.exists()
    loaded_from = Path(_native.status().removeprefix("loaded from "))
    assert loaded_from.parent != shared and loaded_from.parent.name.startswith(f"shira_export-{os.getuid()}-")
    assert stat.S_IMODE(os.stat(loaded_from.parent).st_mode) == 0o700
    _works()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file to another user")
def test_a_library_owned_by_another_user_is_not_loaded(fresh):
    assert _native.loaded()
    (lib,) = (fresh / "cache").glob("kernels-*.so")
    os.chown(lib, 12345, 12345)
    why = _native._open_trusted(lib)
    assert why[0] is None and "owned by us" in why[1]
