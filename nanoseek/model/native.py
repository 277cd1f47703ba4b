"""packed.py's GEMM and MoE products as operators registered in C++ (native.cpp, torch's stable ABI),
for compiled decode steps: inductor's C++ wrapper calls them through the dispatcher, never entering
Python.

    from nanoseek.model import native
    native.load()     # builds native.cpp + gemv.c once (g++, ~8 s, cached); False if it cannot
    torch.ops.nanoseek_native.gemm_packed(x, pack, bias, N)          # = packed.linear's product

Why. packed.py's products were Python custom ops: inside a compiled graph each call went from the
C++ wrapper back into Python (argument boxing, the op's Python body, the pack's staleness check)
for ~20-30 µs, so only weights of at least 2^16 values were worth packing, and a small model's step
kept its ~50 small linears on MKL: ~1.2 ms of a 5-6 ms step at batch 1 (`small`, perf), ~1.9 ms
at 2 rows, where sgemm takes the place of sgemv. Called from C++, one product of the small shapes
(96x320 ... 384x64, 8 layers' copies cycled, 1 thread, in a compiled function, 2026-11-30) took:

    rows               1      2      4      16
    MKL (µs)           22.8   31.5   39.3   57.0
    native op (µs)     14.8   21.1   13.3   26.6

Staleness. The C++ ops do not check whether a pack still matches its weight (the version counter
is not part of the stable ABI). `packed.refresh(module)` does it in Python, once for every pack
of the module, and whoever runs compiled code on packs calls it first: engine/graphs.py does, at
every step (~40 µs for small's 90 packs). Eager products keep checking per call (packed._run).

Build. g++ compiles native.cpp against torch's headers (the stable C++ API: header-only, so ~8 s)
and links it with gemv.c (gcc) and libtorch into one library in gemv.py's cache directory; the
library registers the ops when loaded (`torch.ops.load_library`). Without a C++ compiler, torch's
headers, or when the self-check fails, `load()` returns False, says why (`reason()`), and packed.py
keeps its Python ops.

Reference: packed._run / packed._moe, the Python ops, on the same packs (tests/model/test_packed.py).
"""
from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.model import gemv

SOURCE = Path(__file__).with_name("native.cpp")
_loaded = False
_reason: str | None = None
_path: Path | None = None


def reason() -> str | None:
    return _reason


def available() -> bool:
    return _loaded


def avx512(want: bool) -> bool:
    """Turn the operators' AVX-512 block (gemv.c, 4 rows and more) on or off; returns whether it runs
    (False without AVX-512F). Results are bit-identical either way: for tests and A/B timing."""
    lib = ctypes.CDLL(str(_path))           # the library torch loaded: the same handle, the same switch
    lib.nanoseek_avx512.argtypes, lib.nanoseek_avx512.restype = [ctypes.c_int], ctypes.c_int
    return bool(lib.nanoseek_avx512(int(want)))


def _commands(out: Path, tmp: Path, cc: str, cxx: str) -> list[list[str]]:
    root = Path(torch.__file__).parent
    return [[cc, "-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-c", str(gemv.SOURCE), "-o", str(tmp / "gemv.o")],
            [cxx, "-O2", "-std=c++17", "-fPIC", f"-DNANOSEEK_TORCH={torch.__version__}",   # in the cache key
             "-I", str(root / "include"), "-c", str(SOURCE), "-o", str(tmp / "native.o")],
            [cxx, "-shared", "-fopenmp", str(tmp / "native.o"), str(tmp / "gemv.o"), "-o", str(out),
             "-L", str(root / "lib"), "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{root / 'lib'}"]]


def _register_fakes() -> None:
    @torch.library.register_fake("nanoseek_native::gemm_packed")
    def _(x, pack, bias, n):
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("nanoseek_native::moe_packed")
    def _(x, topk_idx, topk_weight, gate_up, down, E, I):
        return torch.empty_like(x)


def _self_check() -> str | None:
    g = torch.Generator().manual_seed(0)
    for M in (1, 2, 7, 13):
        for N, K in ((37, 29), (16, 8)):
            x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
            y = torch.ops.nanoseek_native.gemm_packed(x, gemv.pack16(w), b, N)
            if not torch.allclose(y.double(), F.linear(x.double(), w.double(), b.double()), rtol=1e-5, atol=1e-5):
                return f"nanoseek_native.gemm_packed disagrees with F.linear at M={M} N={N} K={K}"
    return None


def load() -> bool:
    """Build (once per machine), load and check the ops; True when packed.py may use them."""
    global _loaded, _reason, _path
    if _loaded or _reason is not None:
        return _loaded
    if not gemv.load():
        _reason = f"gemv.c is not in use: {gemv.reason()}"
        return False
    cc = gemv._compiler()
    cxx = next((c for c in (os.environ.get("CXX"), "g++", "c++") if c and shutil.which(c)), None)
    if cxx is None:
        _reason = "no C++ compiler (g++ or $CXX) found"
        return False
    try:
        path = gemv.build("native", (SOURCE, gemv.SOURCE), lambda out, tmp: _commands(out, tmp, cc, cxx))
        if not hasattr(torch.ops.nanoseek_native, "gemm_packed"):
            torch.ops.load_library(str(path))
            _register_fakes()
        why = _self_check()
    except (OSError, RuntimeError) as e:
        why = str(e)
    if why is not None:
        _reason = why
        return False
    _loaded, _path = True, path
    return True
