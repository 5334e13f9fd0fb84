"""Native fp32 CPU kernels for the tuner's O(nnz) ops, with torch as the fallback.

Small C loops (kernels.c): the values' gradient (an SDDMM: one dot product of length
`tokens` per nonzero, over tiles of both operands transposed in cache), the scatter of
merges and unmerges, and the adapter switch (the old support's entries restored and the
new one's written block by block: one pass over the weight). torch runs each as several
passes plus copies (tools/bench_train.py --ops, tools/bench_switch.py --no-native). They
are compiled once per machine with the system C compiler (`$CC`, else cc / gcc / clang)
into `$SHIRA_EXPORT_CACHE` (default ~/.cache/shira_export, else a per-user folder in the temp dir), and called through
ctypes, which releases the GIL. A cached library is loaded only from a folder no one else
can write (created 0700, owned by us) and only if it is ours, not writable by others and
has the sha256 recorded when we built it; otherwise it is rebuilt (docs/security.md).
No compiler, a failed build or `SHIRA_EXPORT_NATIVE=0`: the torch ops run instead, same
results.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from shira_export._native.trust import _digest_fd, _dlopen, _open_trusted, _private_dir, _record

__all__ = ["SDDMM_BLOCK_COLS", "available", "loaded", "sddmm", "scatter_", "status", "switch_"]

_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-fPIC", "-shared"]
# Best first; OpenMP shares torch's libgomp pool, -fopenmp-simd alone runs serially.
_VARIANTS = (["-fopenmp", "-march=native"], ["-fopenmp"], ["-fopenmp-simd", "-march=native"], ["-fopenmp-simd"])
# Column-block width of the SDDMM's pattern (kernels.c CB; the kernel refuses another).
SDDMM_BLOCK_COLS = 256
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {"lib": None, "tried": False, "why": "not loaded yet"}


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("SHIRA_EXPORT_CACHE") or Path.home() / ".cache" / "shira_export")


def _cpu_signature() -> str:
    """-march=native code is only valid on the CPU that built it: key the cache on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- a cache no one else can write into ---------------------------------------------------
# The library is loaded into this process, so whoever can write it (or the folder holding
# it, or a folder above) runs code as us. The key of its name is computable by anyone, so
# a shared temp folder must never serve a file we did not build.


def _folders() -> list[Path]:
    """Where to look for / build the library, best first: the user cache, then a per-user
    folder in the temp dir (only if it is private and ours)."""
    return [_cache_dir(), Path(tempfile.gettempdir()) / f"shira_export-{os.getuid()}"]


def _library_name(cc: str) -> str:
    key = hashlib.sha256(
        _SOURCE.read_bytes() + cc.encode() + repr((_FLAGS, _VARIANTS)).encode() + _cpu_signature().encode()
    ).hexdigest()
    return f"kernels-{key[:16]}.so"


def _build(cc: str) -> tuple[ctypes.CDLL, Path]:
    name = _library_name(cc)
    refused: list[str] = []
    folder = None
    for candidate in _folders():
        why = _private_dir(candidate)
        if why is None:
            folder = candidate
            break
        refused.append(why)
    if folder is None:  # every shared location refused: a fresh private folder, for this process
        folder = Path(tempfile.mkdtemp(prefix=f"shira_export-{os.getuid()}-"))
        _log.info("native kernels: building in %s (%s)", folder, "; ".join(refused))
    target = folder / name
    if target.exists() or target.is_symlink():
        fd, why = _open_trusted(target)
        if fd is not None:
            return _dlopen(fd, target), target
        _log.warning("native kernels: not loading %s (%s); rebuilding it", target, why)
    # Build beside the target and rename: ranks of a DDP job may build at the same time.
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        errors = []
        for extra in _VARIANTS:  # some compilers lack OpenMP, some arches refuse -march=native
            done = subprocess.run([cc, *_FLAGS, *extra, "-o", tmp, str(_SOURCE)], capture_output=True, text=True)
            if done.returncode == 0:
                os.chmod(tmp, 0o700)
                lib_fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                digest = _digest_fd(lib_fd)
                record_tmp = Path(tmp + ".sha256")
                record_tmp.write_text(digest + "\n")
                os.replace(record_tmp, _record(target))
                os.replace(tmp, target)
                return _dlopen(lib_fd, target), target
            errors.append(done.stderr.strip()[-500:])
        raise RuntimeError(f"{cc} could not build {_SOURCE}: {errors[-1]}")
    finally:
        for leftover in (tmp, tmp + ".sha256"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _load() -> Optional[ctypes.CDLL]:
    if os.environ.get("SHIRA_EXPORT_NATIVE", "1") == "0":
        _state["why"] = "disabled by SHIRA_EXPORT_NATIVE=0"
        return None
    if sys.platform == "win32":  # the build below makes POSIX shared objects
        _state["why"] = "not built on Windows: using torch ops"
        return None
    cc = _compiler()
    if cc is None:
        _state["why"] = "no C compiler found ($CC, cc, gcc, clang): using torch ops"
        return None
    try:
        lib, path = _build(cc)
    except (OSError, RuntimeError) as exc:
        _state["why"] = f"native kernels unavailable ({exc}): using torch ops"
        _log.warning(_state["why"])
        return None
    _state["why"] = f"loaded from {path}"
    return _declare(lib)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.shira_sddmm_f32.argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.shira_scatter_f32.argtypes = [ptr, i64, ptr, ptr, i64, ctypes.c_int]
    lib.shira_switch_f32.argtypes = [ptr, i64, ptr, ptr, i64, ptr, ptr, i64, i64, ctypes.c_int]
    return lib


def _lib() -> Optional[ctypes.CDLL]:
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["lib"] = _load()
                _state["tried"] = True
    return _state["lib"]


def status() -> str:
    """Why the native kernels are (not) in use, for benchmarks and bug reports."""
    _lib()
    return _state["why"]


def _reset_for_tests() -> None:
    _state.update(lib=None, tried=False, why="not loaded yet")


def _fits(*tensors: torch.Tensor) -> bool:
    return all(t.is_cpu and t.is_contiguous() for t in tensors)


# ---- argument checks: explicit (asserts vanish under python -O), since a wrong pointer
# or length reaches C unchecked. Programming errors: TypeError (type, dtype), ValueError
# (device, layout, shape), RuntimeError (the kernels are not loaded).


def _loaded_lib(fn: str) -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise RuntimeError(
            f"_native.{fn}: the native kernels are not loaded ({_state['why']}); check available() first"
        )
    return lib


def _check(fn: str, dtype: torch.dtype, dim: Optional[int], **tensors: object) -> None:
    """Each of `tensors` is a contiguous CPU torch.Tensor of `dtype` with `dim` dims (None: any)."""
    for name, t in tensors.items():
        if not (
            isinstance(t, torch.Tensor)
            and t.dtype == dtype
            and t.is_cpu
            and t.is_contiguous()
            and (dim is None or t.dim() == dim)
        ):
            _refuse(fn, name, t, dtype, dim)


def _refuse(fn: str, name: str, t: object, dtype: torch.dtype, dim: Optional[int]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"_native.{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"_native.{fn}: {name} must be {dtype}, got {t.dtype}")
    if not t.is_cpu or not t.is_contiguous():
        raise ValueError(
            f"_native.{fn}: {name} must be a contiguous CPU tensor, got one on {t.device}"
            f"{'' if t.is_contiguous() else ', not contiguous'}"
        )
    raise ValueError(f"_native.{fn}: {name} must have {dim} dimension(s), got shape {tuple(t.shape)}")


def _check_len(fn: str, positions: str, n_positions: int, values: str, n_values: int) -> None:
    if n_positions != n_values:
        raise ValueError(f"_native.{fn}: {positions} has {n_positions} entries but {values} has {n_values}")


def loaded() -> bool:
    """True when the kernels are built and loaded (they serve fp32 CPU tensors)."""
    return _lib() is not None


def available(tensor: torch.Tensor) -> bool:
    """True when the native kernels can serve this fp32, contiguous CPU tensor."""
    return tensor.dtype == torch.float32 and _fits(tensor) and _lib() is not None


def sddmm(
    a: torch.Tensor, b: torch.Tensor, crow: torch.Tensor, bptr: torch.Tensor, bcol: torch.Tensor, dest: torch.Tensor
) -> torch.Tensor:
    """out[dest[k]] = sum_t a[t, row(k)] * b[t, col(k)]: a [T, n_a], b [T, n_b] fp32
    contiguous; the pattern over (a column, b column) pairs grouped by blocks of
    SDDMM_BLOCK_COLS b columns (sparse_ops.SparsePlan.sddmm_pattern builds it): `crow`
    [n_a + 1] plain row pointers, `bptr` [n_blocks, n_a + 1], `bcol` uint8 [nnz] column
    within the block, `dest` int32 [nnz] a permutation. Returns [nnz] fp32."""
    lib = _loaded_lib("sddmm")
    _check("sddmm", torch.float32, 2, a=a, b=b)
    _check("sddmm", torch.int64, 1, crow=crow)
    _check("sddmm", torch.int64, 2, bptr=bptr)
    _check("sddmm", torch.uint8, 1, bcol=bcol)
    _check("sddmm", torch.int32, 1, dest=dest)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"_native.sddmm: a has {a.shape[0]} rows (tokens) but b has {b.shape[0]}")
    n_a, n_b = a.shape[1], b.shape[1]
    blocks = (-(-n_b // SDDMM_BLOCK_COLS), n_a + 1)
    if crow.numel() != n_a + 1 or tuple(bptr.shape) != blocks:
        raise ValueError(
            f"_native.sddmm: the pattern is for another shape: crow has {crow.numel()} entries and "
            f"bptr shape {tuple(bptr.shape)}, expected {n_a + 1} and {blocks} for a [T, {n_a}], b [T, {n_b}]"
        )
    _check_len("sddmm", "dest", dest.numel(), "bcol", bcol.numel())
    if int(crow[-1]) != bcol.numel():  # the kernel sizes its accumulator from crow[-1]
        raise ValueError(f"_native.sddmm: crow ends at {int(crow[-1])}, the pattern has {bcol.numel()} nonzeros")
    out = torch.empty(bcol.numel(), dtype=torch.float32)
    rc = lib.shira_sddmm_f32(
        a.data_ptr(),
        n_a,
        b.data_ptr(),
        n_b,
        a.shape[0],
        crow.data_ptr(),
        bptr.data_ptr(),
        bcol.data_ptr(),
        dest.data_ptr(),
        SDDMM_BLOCK_COLS,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if rc == -3:
        raise ValueError("_native.sddmm: the pattern points outside its nonzeros (bptr or dest out of range)")
    if rc != 0:
        raise (
            MemoryError(f"shira_sddmm_f32 failed ({rc}): out of memory for its scratch buffers")
            if rc == -1
            else RuntimeError(f"shira_sddmm_f32 refused the call ({rc})")
        )
    return out


def scatter_(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> None:
    """w[flat] = values in place (int64 positions into the contiguous weight's storage;
    one outside it is not written and raises ValueError, after the others are)."""
    lib = _loaded_lib("scatter_")
    _check("scatter_", torch.float32, None, weight=weight)
    _check("scatter_", torch.int64, 1, flat=flat)
    _check("scatter_", torch.float32, 1, values=values)
    _check_len("scatter_", "flat", flat.numel(), "values", values.numel())
    rc = lib.shira_scatter_f32(
        weight.data_ptr(), weight.numel(), flat.data_ptr(), values.data_ptr(), flat.numel(), torch.get_num_threads()
    )
    if rc != 0:  # the kernel wrote the others
        raise ValueError(f"_native.scatter_: positions outside the weight's {weight.numel()} elements were not written")


def switch_(
    weight: torch.Tensor,
    old_flat: torch.Tensor,
    old_values: torch.Tensor,
    new_flat: torch.Tensor,
    new_values: torch.Tensor,
    *,
    block: int = 8192,
) -> None:
    """w[old_flat] = old_values, then w[new_flat] = new_values, in one pass over the
    weight's storage (int32 position lists, ascending; weights under 2^31 elements).
    A position out of range raises ValueError and is never written (nor, in unsorted
    lists, anything out of bounds). The caller bumps weight._version."""
    lib = _loaded_lib("switch_")
    _check("switch_", torch.float32, None, weight=weight)
    _check("switch_", torch.float32, 1, old_values=old_values, new_values=new_values)
    _check("switch_", torch.int32, 1, old_flat=old_flat, new_flat=new_flat)
    _check_len("switch_", "old_flat", old_flat.numel(), "old_values", old_values.numel())
    _check_len("switch_", "new_flat", new_flat.numel(), "new_values", new_values.numel())
    if weight.numel() >= 2**31:
        raise ValueError(f"_native.switch_: int32 positions cover weights under 2^31 elements, got {weight.numel()}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"_native.switch_: block must be a positive int, got {block!r}")
    rc = lib.shira_switch_f32(
        weight.data_ptr(),
        weight.numel(),
        old_flat.data_ptr(),
        old_values.data_ptr(),
        old_flat.numel(),
        new_flat.data_ptr(),
        new_values.data_ptr(),
        new_flat.numel(),
        block,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"_native.switch_: positions outside the weight's {weight.numel()} elements, or not ascending")
