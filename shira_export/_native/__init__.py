"""Native fp32 CPU kernels for the tuner's O(nnz) ops, with torch as the fallback.

Small C loops (kernels.c): the values' gradient (an SDDMM: one dot product of length
`tokens` per nonzero, over tiles of both operands transposed in cache), the scatter of
merges and unmerges, and the adapter switch (the old support's entries restored and the
new one's written block by block: one pass over the weight). torch runs each as several passes plus copies (tools/bench_train.py --ops,
tools/bench_switch.py --no-native). They are compiled once per machine with the system
C compiler (`$CC`, else cc / gcc / clang) into `$SHIRA_EXPORT_CACHE` (default
~/.cache/shira_export, else the temp folder) and called through ctypes, which releases
the GIL. No compiler, a failed build or `SHIRA_EXPORT_NATIVE=0`: the torch ops run
instead, same results.
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


def _build(cc: str) -> Path:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + cc.encode() + repr((_FLAGS, _VARIANTS)).encode() + _cpu_signature().encode()).hexdigest()
    name = f"kernels-{key[:16]}.so"
    user = os.getuid() if hasattr(os, "getuid") else "user"
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"shira_export-{user}"):
        if (folder / name).exists():
            return folder / name
        try:  # a read-only home: build in the temp folder instead
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                break
        except OSError:
            continue
    else:
        raise RuntimeError(f"no writable folder for {name} ({_cache_dir()} nor the temp folder)")
    target = folder / name
    # Build beside the target and rename: ranks of a DDP job may build at the same time.
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        errors = []
        for extra in _VARIANTS:  # some compilers lack OpenMP, some arches refuse -march=native
            done = subprocess.run([cc, *_FLAGS, *extra, "-o", tmp, str(_SOURCE)], capture_output=True, text=True)
            if done.returncode == 0:
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)
                return target
            errors.append(done.stderr.strip()[-500:])
        raise RuntimeError(f"{cc} could not build {_SOURCE}: {errors[-1]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError) as exc:
        _state["why"] = f"native kernels unavailable ({exc}): using torch ops"
        _log.warning(_state["why"])
        return None
    _state["why"] = f"loaded from {lib._name}"
    return _declare(lib)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.shira_sddmm_f32.argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.shira_scatter_f32.argtypes = [ptr, ptr, ptr, i64, ctypes.c_int]
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
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def loaded() -> bool:
    """True when the kernels are built and loaded (they serve fp32 CPU tensors)."""
    return _lib() is not None


def available(tensor: torch.Tensor) -> bool:
    """True when the native kernels can serve this fp32, contiguous CPU tensor."""
    return tensor.dtype == torch.float32 and _fits(tensor) and _lib() is not None


def sddmm(a: torch.Tensor, b: torch.Tensor, crow: torch.Tensor, bptr: torch.Tensor, bcol: torch.Tensor,
          dest: torch.Tensor) -> torch.Tensor:
    """out[dest[k]] = sum_t a[t, row(k)] * b[t, col(k)]: a [T, n_a], b [T, n_b] fp32
    contiguous; the pattern over (a column, b column) pairs grouped by blocks of
    SDDMM_BLOCK_COLS b columns (sparse_ops.SparsePlan.sddmm_pattern builds it): `crow`
    [n_a + 1] plain row pointers, `bptr` [n_blocks, n_a + 1], `bcol` uint8 [nnz] column
    within the block, `dest` int32 [nnz] a permutation. Returns [nnz] fp32."""
    lib = _lib()
    assert lib is not None and _fits(a, b, crow, bptr, bcol, dest) and a.dtype == b.dtype == torch.float32
    assert a.dim() == b.dim() == 2 and a.shape[0] == b.shape[0] and bcol.dtype == torch.uint8
    n_a, n_b = a.shape[1], b.shape[1]
    assert crow.numel() == n_a + 1 and bptr.shape == (-(-n_b // SDDMM_BLOCK_COLS), n_a + 1)
    assert dest.dtype == torch.int32 and dest.numel() == bcol.numel()
    out = torch.empty(bcol.numel(), dtype=torch.float32)
    rc = lib.shira_sddmm_f32(a.data_ptr(), n_a, b.data_ptr(), n_b, a.shape[0], crow.data_ptr(), bptr.data_ptr(),
                             bcol.data_ptr(), dest.data_ptr(), SDDMM_BLOCK_COLS, out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"shira_sddmm_f32 failed ({rc}): out of memory for its scratch buffers") if rc == -1 else \
            RuntimeError(f"shira_sddmm_f32 refused the call ({rc})")
    return out


def scatter_(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> None:
    """w[flat] = values in place."""
    lib = _lib()
    assert lib is not None and _fits(weight, flat, values) and weight.dtype == values.dtype == torch.float32
    lib.shira_scatter_f32(weight.data_ptr(), flat.data_ptr(), values.data_ptr(), flat.numel(), torch.get_num_threads())


def switch_(weight: torch.Tensor, old_flat: torch.Tensor, old_values: torch.Tensor, new_flat: torch.Tensor,
            new_values: torch.Tensor, *, block: int = 8192) -> None:
    """w[old_flat] = old_values, then w[new_flat] = new_values, in one pass over the
    weight (int32 position lists, ascending; weights under 2^31 elements). The caller
    bumps weight._version."""
    lib = _lib()
    assert lib is not None and _fits(weight, old_flat, old_values, new_flat, new_values)
    assert old_flat.dtype == new_flat.dtype == torch.int32 and weight.numel() < 2**31
    assert weight.dtype == old_values.dtype == new_values.dtype == torch.float32
    lib.shira_switch_f32(weight.data_ptr(), weight.numel(), old_flat.data_ptr(), old_values.data_ptr(),
                         old_flat.numel(), new_flat.data_ptr(), new_values.data_ptr(), new_flat.numel(), block,
                         torch.get_num_threads())
