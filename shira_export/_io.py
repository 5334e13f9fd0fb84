"""Safe writes: outputs appear complete or not at all, never over an input or a user's file.

- `atomic_path` / `atomic_write_text`: a file, via a temp file beside it + rename.
- `atomic_dir`: a folder, built in a temp sibling and published by a rename that never
  replaces what another process published meanwhile; `overwrite` moves the old folder to a
  backup name owned by this run first, so a run killed between the two renames leaves it
  recoverable (the next run on that output puts it back).
- Temp and backup siblings are named `.<name>.shira-<host>-<pid>-<random>.tmp|.old`: only
  such names whose process is gone (same host, same user) are ever cleaned up.
- `check_output_location`: the output must not be, contain or lie inside an input.
- `folder_lock`: an advisory lock (flock) for read-modify-write of a folder's manifest.
- `confined`: a relative path from a manifest, refused when it leaves its folder.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from shira_export.errors import ShiraInputError, is_input_os_error

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_dir",
    "check_output_location",
    "folder_lock",
    "confined",
    "describe_path",
    "rename_noreplace",
    "sha256_file",
]

PathLike = Union[str, os.PathLike]
_OURS = re.compile(r"^\.(?P<name>.+)\.shira-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[A-Za-z0-9_]+\.(?P<kind>tmp|old)$")
_TAG_BYTES = 48  # what our temp names add to the output's name (".", ".shira-", host, pid, random, ".tmp")
LOCK_NAME = ".shira_export.lock"


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _prefix(path: Path) -> str:
    return f".{path.name}.shira-{_host()}-{os.getpid()}-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_path(path: PathLike, *, want: str) -> str:
    """Why `path` is not the `want` ("file" or "folder") it should be: for error messages."""
    p = Path(path)
    if p.is_dir():
        return "is a folder, expected a file" if want == "file" else "is a folder"
    if p.exists():
        return "is a file, expected a folder" if want == "folder" else "is not a regular file"
    return "not found"


def _name_fits(path: Path) -> None:
    try:
        limit = os.pathconf(path.parent if path.parent.exists() else ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    size = len(os.fsencode(path.name))
    if size + _TAG_BYTES > limit:
        raise ShiraInputError(
            f"{path}: name too long ({size} bytes; at most {limit - _TAG_BYTES} bytes here, "
            f"since the file system allows {limit} and temp names add {_TAG_BYTES})"
        )


def _make_parent(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_input_os_error(exc):
            raise ShiraInputError(f"{parent}: cannot create the output's parent folder ({exc.strerror})") from None
        raise
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ShiraInputError(f"{parent}: output location is not writable (read-only or no permission)")


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    _name_fits(path)
    _make_parent(path.parent)
    for stale, _ in _stale(path.parent, path.name):  # temp files of killed writers of this path
        _remove(stale)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- no-replace rename --------------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2(src: str, dst: str) -> Optional[bool]:
    """Linux renameat2(RENAME_NOREPLACE): True done, None unsupported; raises on EEXIST etc."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL)):
        return None  # old kernel or a file system without RENAME_NOREPLACE: the caller falls back
    raise OSError(err, os.strerror(err), src, None, dst)


def rename_noreplace(src: PathLike, dst: PathLike) -> None:
    """Rename `src` to `dst`, raising FileExistsError if `dst` exists (never replacing it,
    even when another process creates it at the same moment)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.name == "nt":  # Windows' rename already refuses an existing target
        os.rename(src, dst)
        return
    if _renameat2(src, dst):
        return
    if os.path.isdir(src):
        os.mkdir(dst)  # claims the name (EEXIST for the loser); rename may replace an empty folder
        try:
            os.rename(src, dst)
        except BaseException:
            os.rmdir(dst)
            raise
    else:
        os.link(src, dst)  # EEXIST for the loser
        os.unlink(src)


# --- folders ------------------------------------------------------------------------------


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_location(
    output: PathLike, inputs: Iterable[Optional[PathLike]] = (), *, overwrite: bool = False
) -> Path:
    """Refuse an output folder that exists (unless `overwrite`), is not a folder, or that is,
    contains or lies inside one of `inputs` (replacing it would delete or change an input),
    the current folder or the home folder. Returns `output` as a Path."""
    output = Path(output)
    _name_fits(output)
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise ShiraInputError(f"{output}: exists and is not a folder (expected a folder or a new path)")
        if not overwrite:
            raise ShiraInputError(f"{output}: output folder exists (pass overwrite=True / --overwrite to replace it)")
    out = output.resolve()
    for src in inputs:
        if src is None:
            continue
        resolved = Path(src).resolve()
        if _inside(out, resolved) or _inside(resolved, out):
            raise ShiraInputError(
                f"{output}: overlaps the input folder {src} (resolved {resolved}); choose an output "
                f"outside the inputs (replacing it would delete or change an input)"
            )
    for keep, what in ((Path.cwd(), "the current folder"), (Path(os.path.expanduser("~")), "the home folder")):
        if _inside(keep.resolve(), out):
            raise ShiraInputError(f"{output}: is or contains {what}; choose a new folder for the output")
    return output


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def run_owned_name(path: PathLike, kind: str) -> Path:
    """A sibling name for `path` owned by this run (`kind` "tmp" or "old"), recognised later
    as debris once this process is gone."""
    path = Path(path)
    return path.with_name(f"{_prefix(path)}{secrets.token_hex(4)}.{kind}")


def stale_siblings(path: PathLike) -> list[tuple[Path, str]]:
    """(sibling, "tmp" | "old") left by dead runs on `path` (this host, this user)."""
    path = Path(path)
    return _stale(path.parent, path.name)


def _stale(parent: Path, name: str) -> list[tuple[Path, str]]:
    """Our temp/backup siblings of `parent/name` whose process is gone (this host, this user)."""
    found = []
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    for entry in entries:
        m = _OURS.match(entry.name)
        if not m or m["name"] != name or m["host"] != _host() or _alive(int(m["pid"])):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if uid is None or st.st_uid == uid:
            found.append((Path(entry.path), m["kind"]))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def recover_and_clean(path: PathLike) -> Optional[Path]:
    """Debris of dead runs on `path`: a backup left by an overwrite killed between its two
    renames is put back when `path` is missing (returned); other debris is removed."""
    path = Path(path)
    stale = _stale(path.parent, path.name)
    backups = sorted((p for p, kind in stale if kind == "old"), key=lambda p: p.stat().st_mtime)
    restored = None
    if backups and not (path.exists() or path.is_symlink()):
        try:
            rename_noreplace(backups[-1], path)
            restored = path
            backups.pop()
        except OSError:
            pass
    for p, kind in stale:
        if kind == "tmp" or p in backups:
            _remove(p)
    return restored


@contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False, *, inputs: Iterable[Optional[PathLike]] = ()) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it becomes `path` (see the module doc).

    Without `overwrite`, if another process published `path` while this one ran, this one's
    result is discarded with a ShiraInputError (never a silent replace)."""
    path = Path(path)
    _name_fits(path)
    recover_and_clean(path)
    check_output_location(path, inputs, overwrite=overwrite)
    _make_parent(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        _publish(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    backup = None
    if overwrite and (path.exists() or path.is_symlink()):
        backup = run_owned_name(path, "old")
        rename_noreplace(path, backup)
    try:
        rename_noreplace(tmp, path)
    except FileExistsError:
        if backup is not None:  # someone published meanwhile: keep theirs, say where ours went
            raise ShiraInputError(
                f"{path}: another process published this output while this one ran; its "
                f"folder was kept, the previous one is at {backup}"
            ) from None
        raise ShiraInputError(
            f"{path}: another process created this output while this one ran; nothing was "
            f"replaced and this run's result was discarded (run again with --overwrite to "
            f"replace it)"
        ) from None
    except BaseException:
        if backup is not None:
            rename_noreplace(backup, path)
        raise
    if backup is not None:
        _remove(backup)  # a folder, or the symlink OUT was (its target is not touched)


# --- locks and confined paths -------------------------------------------------------------


@contextmanager
def folder_lock(folder: PathLike, *, timeout: float = 120.0) -> Iterator[None]:
    """Exclusive advisory lock on `folder` (a lock file in it) for read-modify-write updates.
    Waits up to `timeout` seconds for another holder, then raises ShiraInputError."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; updates are then not serialized
        yield
        return
    lock_path = Path(folder) / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lock_path, flags, 0o644)
    except OSError as exc:
        raise ShiraInputError(f"{lock_path}: cannot open the folder's lock file ({exc.strerror})") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ShiraInputError(
                        f"{folder}: locked by another shira-export process for over "
                        f"{timeout:.0f} s ({lock_path}); try again when it has finished"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def confined(folder: PathLike, rel: object, *, what: str) -> Path:
    """`folder / rel` for a relative path read from a file in `folder`; refused when it is
    absolute, climbs with '..', or resolves (through symlinks) outside `folder`."""
    folder = Path(folder)
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ShiraInputError(f"{what}: expected a relative path inside {folder}, found {rel!r}")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts:
        raise ShiraInputError(f"{what}: {rel!r} leaves the folder {folder} (absolute or '..'); refused")
    target = folder / rel
    if not _inside(target.resolve(), folder.resolve()):
        raise ShiraInputError(f"{what}: {rel!r} resolves to {target.resolve()}, outside {folder} (a symlink?); refused")
    return target
