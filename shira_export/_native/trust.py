"""Trust checks for the cached native library: only a file we built, in a folder no one
else can write, with the sha256 recorded when we built it, is loaded (docs/security.md)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
from pathlib import Path
from typing import Optional

__all__ = ["_digest_fd", "_dlopen", "_open_trusted", "_private_dir", "_record"]


def _safe_owner(st: os.stat_result) -> bool:
    return st.st_uid in (os.getuid(), 0)


def _writable_by_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _secure_ancestors(folder: Path) -> bool:
    """Every folder above `folder`: owned by us or root, and not writable by others unless
    sticky (like /tmp, where others cannot rename what we own)."""
    for parent in folder.resolve().parents:
        try:
            st = os.stat(parent)
        except OSError:
            return False
        if not _safe_owner(st) or (_writable_by_others(st) and not st.st_mode & stat.S_ISVTX):
            return False
    return True


def _private_dir(folder: Path) -> Optional[str]:
    """None if `folder` is (made) a folder only we can write, else why not."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(folder)
    except OSError as exc:
        return f"{folder}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return f"{folder}: a symlink or not a folder"
    if st.st_uid != os.getuid():
        return f"{folder}: owned by uid {st.st_uid}, not by us"
    if _writable_by_others(st):
        return f"{folder}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder}: not writable"
    if not _secure_ancestors(folder):
        return f"{folder}: a folder above it can be changed by another user"
    return None


def _digest_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    for chunk in iter(lambda: os.read(fd, 1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _record(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _open_trusted(lib: Path) -> tuple[Optional[int], str]:
    """(fd of `lib`, "") if it is a regular file we own, not writable by others, whose
    sha256 equals the one recorded when we built it; else (None, why)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lib, flags)
    except OSError as exc:
        return None, f"{lib}: {exc.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or _writable_by_others(st):
            raise ValueError(f"{lib}: not a regular file owned by us and writable only by us")
        record = _record(lib)
        rst = os.lstat(record)
        if not stat.S_ISREG(rst.st_mode) or rst.st_uid != os.getuid() or _writable_by_others(rst):
            raise ValueError(f"{record}: not a regular file owned by us")
        if record.read_text().strip() != _digest_fd(fd):
            raise ValueError(f"{lib}: sha256 differs from the one recorded when it was built")
    except (OSError, ValueError) as exc:
        os.close(fd)
        return None, str(exc)
    return fd, ""


def _dlopen(fd: int, lib: Path) -> ctypes.CDLL:
    """Load the very file we checked (through its descriptor where /proc allows it)."""
    proc = Path(f"/proc/self/fd/{fd}")
    try:
        return ctypes.CDLL(str(proc) if proc.exists() else str(lib))
    finally:
        os.close(fd)
