"""Matrix-vector products at memory speed: the decode-step linears of a bf16 (or fp32) model on CPU.

    from nanoseek.model import gemv
    gemv.load()              # builds gemv.c once (gcc, ~1 s, cached on disk); False if it cannot
    y = gemv.linear(x, w, b) # F.linear; bf16 x with <= MAX_ROWS (64) rows runs on the kernel,
                             # fp32 x of 2..8 rows with large weights too (FP32_* below)

Why. At batch 1 a decode step reads every weight once for a handful of FLOPs per byte, so its speed
limit is memory bandwidth. On this AVX2 CPU (no native bf16 arithmetic) torch's bf16 F.linear at one
row reads its weights at 6.5-7 GB/s with one thread and 11-12.5 with two, where a plain sum over
memory reads ~10-11 and ~15-16 (issue 13; `nanoseek bench engine --preset r1_distill_qwen_1p5b` prints both). The
kernel (gemv.c) widens bf16 to fp32 with a 16-bit shift and streams 4 weight rows at a time
through FMAs, prefetching the next rows; fp32 accumulation and one rounding to bf16, as F.linear
does. `nanoseek bench gemv` measures it; in one process, interleaved (2026-11-30, this 2-core AVX2
machine), GB/s of weights read, kernel vs F.linear:

    rows  threads  1536->8960 (gate/up)  8960->1536 (down)  1536->151936 (lm_head)
    1     1        8.2 vs 6.5            11.7 vs 6.9        9.2 vs 7.0
    1     2        13.8 vs 12.5          17.1 vs 11.3       14.1 vs 11.5
    2     1        7.9 vs 3.7            9.9 vs 4.1         9.2 vs 4.3
    8     1        3.4 vs 1.0            3.6 vs 1.2         3.5 vs 1.1

(torch's bf16 GEMM re-reads the weights for every row; here 8 rows cost ~2.4x one row, not 8x.)
Past 8 rows (a short prefill, speculation's verification at batch > 4) each weight row serves every
chunk of 8 rows of x from L1: 1536 -> 8960 at 16 / 32 / 64 rows, 31 / 33 / 29 GFLOP/s vs F.linear's
8.8 / 9.3 / 9.1 (torch's bf16 GEMM on this AVX2 CPU). MAX_ROWS = 64 keeps x
(64 rows x K in fp32) within the caches; longer prefills stay on F.linear.

fp32 weights run the same loop without the widening, where MKL's sgemm is slow: at 2-8 rows it
takes up to twice its 1-row time on the small models' decode shapes (a speculative verification
at batch 1 is 2 rows); see FP32_MIN_WEIGHT for the measured split.

How it runs. The C file is compiled with the system C compiler into a cache directory
($NANOSEEK_CACHE_DIR, else ~/.cache/nanoseek; the file name carries a hash of source and flags) and
loaded with ctypes into this process, which has imported torch: its `omp parallel` runs on torch's
own OpenMP runtime (the same libgomp.so.1, so no second thread pool), with torch.get_num_threads()
threads. The product is a torch custom op (`nanoseek::gemv`), so a torch.compile'd decode step
calls it as one opaque kernel, without a graph break. `load()` checks the kernel against F.linear on
odd shapes before anything uses it; where the CPU lacks AVX2/FMA, no compiler is found or the check
fails, `linear` is F.linear and `load()` says why (`reason()`).

The same library holds packed.py's GEMM and MoE op on pre-packed fp32 weights (what an fp32
model's engine runs its decode steps' large linears on; see there).

Reference: F.linear (tests/model/test_gemv.py: every row count, tails of N and K, bias, strided
weights, inside torch.compile).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_ROWS = 64                 # rows of x the kernel takes; more go to F.linear
SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")

# fp32 weights take the kernel only where it beats MKL's sgemm by more than the custom op's call
# costs (~20-30 µs inside a compiled graph, ~80 in eager). Inside a compiled function (C++ wrapper,
# 1 thread, 24 weight copies cycled, µs per product, kernel / F.linear, 2026-11-30):
#     rows        1          2          4          8          16
#     768x320     268/242    232/282    260/335    258/346    441/402
#     1024x320    284/270    313/419    316/436    386/532    625/661
#     512x256     146/135    202/236    180/212    159/217    339/288
#     128x256     70/43      70/40      63/35      89/68      117/77
# and 4096x320 at 1 / 2 rows 1,026/1,149 and 1,106/2,211 (sgemm at 2 rows takes ~2x its 1-row time).
# So: 2..FP32_MAX_ROWS rows from FP32_MIN_WEIGHT weights, 1 row only from FP32_MIN_WEIGHT_1.
FP32_MIN_WEIGHT = 1 << 17
FP32_MIN_WEIGHT_1 = 1 << 20
FP32_MAX_ROWS = 8
# bf16 on a CPU with native bf16 dot products (AVX512-BF16, AMX), torch's bf16 GEMM runs oneDNN's
# kernels for them and its time barely grows with the rows, while this AVX2 kernel's grows with each.
# Intel Xeon with AMX, 1 thread, ms per product, F.linear / kernel (2026-12-01, the other core busy):
#     rows          1           2           3           4           8           16
#     8960x1536     4.64/2.92   4.39/3.23   4.62/4.23   4.33/5.03   4.60/10.13  4.67/23.54
#     1536x8960     4.18/2.20   3.09/2.64   3.12/3.99   3.02/4.81   3.23/10.27  4.07/21.15
#     2048x1536     0.91/0.78   0.77/0.74   0.74/1.05   0.77/1.13   0.80/2.22   0.88/5.60
# There the kernel takes bf16 products of at most BF16_NATIVE_MAX_ROWS rows; elsewhere (Zen 3, AVX2
# only: the table at the top) up to MAX_ROWS.
BF16_NATIVE_MAX_ROWS = 2
_bf16_max_rows = MAX_ROWS     # set by load(): BF16_NATIVE_MAX_ROWS where native_bf16()
_lib = None                   # the loaded kernel (a ctypes function), once load() succeeded
_cdll = None                  # the library it is in (packed.py's GEMM too)
_loaded = False               # _lib is not None (a plain bool: what compiled code guards on)
_reason: str | None = None    # why it is not loaded, once load() failed
_DTYPES = (torch.bfloat16, torch.float32)


def reason() -> str | None:
    """Why the kernel is not in use (None when it is, or load() has not run)."""
    return _reason


def available() -> bool:
    return _loaded


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where torch's bf16 GEMM beats
    the kernel past BF16_NATIVE_MAX_ROWS rows."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "gcc", "cc"):
        if cc and shutil.which(cc):
            return cc
    return None


def build(name: str, sources: tuple[Path, ...], commands) -> Path:
    """A shared library built once per machine into the cache directory ($NANOSEEK_CACHE_DIR, else
    ~/.cache/nanoseek/kernels), its file name carrying a hash of the sources and the commands.
    commands(out, tmp) -> the argument lists to run, the last of which writes `out`."""
    probe = [" ".join(c) for c in commands(Path("OUT"), Path("TMP"))]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + "\n".join(probe).encode()).hexdigest()[:16]
    root = Path(os.environ.get("NANOSEEK_CACHE_DIR") or Path.home() / ".cache" / "nanoseek") / "kernels"
    out = root / f"{name}-{digest}.so"
    if out.exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp_out = Path(tmp) / out.name
        for cmd in commands(tmp_out, Path(tmp)):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                names = ", ".join(p.name for p in sources)
                raise RuntimeError(f"{cmd[0]} failed on {names}: {proc.stderr.strip()[-500:]}")
        os.replace(tmp_out, out)            # atomic: a concurrent build never loads half a file
    return out


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc or $CC) found")
    return build("gemv", (SOURCE,), lambda out, tmp: [[cc, *FLAGS, str(SOURCE), "-o", str(out)]])


def _self_check() -> str | None:
    """The kernel against F.linear on shapes with tails (N % 4, K % 8), every register-blocked row
    count and a few chunked ones, bias, a strided weight, both dtypes; None when it agrees."""
    g = torch.Generator().manual_seed(0)
    for dtype, rtol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        for M in sorted({*range(1, 10), 16, 19, MAX_ROWS}):
            for N, K in ((37, 29), (64, 128), (5, 8)):
                x = torch.randn(M, K, generator=g).to(dtype)
                w = torch.randn(N, K + 3, generator=g).to(dtype)[:, 1:K + 1]
                b = torch.randn(N, generator=g).to(dtype)
                for bias in (None, b):
                    want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
                    got = _run(x, w, bias).double()
                    if not bool(((got - want).abs() <= rtol * (1 + want.abs())).all()):
                        return f"disagrees with F.linear at M={M} N={N} K={K} bias={bias is not None} {dtype}"
    for M in (1, 2, 3, 5, 6, 7, 13):                 # packed.py's GEMM: row chunks, panel groups and tails
        for N, K in ((37, 29), (100, 29), (16, 8), (5, 3)):
            x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
            p = pack16(w)
            y = torch.empty(M, N)
            _cdll.nanoseek_gemm_packed(x.data_ptr(), K, p.data_ptr(), b.data_ptr(), y.data_ptr(), N, M, N, K, 1)
            if not torch.allclose(y.double(), F.linear(x.double(), w.double(), b.double()), rtol=1e-5, atol=1e-5):
                return f"the packed GEMM disagrees with F.linear at M={M} N={N} K={K}"
    return None


def pack16(w: torch.Tensor) -> torch.Tensor:
    """A contiguous fp32 w [N, K] in panels of 16 rows (nanoseek_pack16), for the load-time checks
    here and in native.py (packed.py, which imports this module, makes the model's packs)."""
    p = torch.empty(-(-w.shape[0] // 16) * 16 * w.shape[1])
    _cdll.nanoseek_pack16(w.data_ptr(), w.shape[1], p.data_ptr(), w.shape[0], w.shape[1])
    return p


def lib() -> ctypes.CDLL:
    """The loaded library (after load() returned True): nanoseek_gemv, packed.py's nanoseek_pack16,
    nanoseek_gemm_packed and nanoseek_moe_packed (nanoseek_avx512(0 | 1): their AVX-512 block off or on where
    the CPU has it), and nanoseek_read (the bench's reading speed)."""
    return _cdll


def avx512(want: bool) -> bool:
    """Turn the packed products' AVX-512 block (4 rows and more) on or off in this library (ctypes
    callers: packed.py's eager products); returns whether it runs. Bit-identical either way."""
    return bool(_cdll.nanoseek_avx512(int(want)))


def load() -> bool:
    """Build (once per machine), load and check the kernel; True when `linear` will use it."""
    global _lib, _cdll, _reason, _loaded, _bf16_max_rows
    if _loaded:
        return True
    if _reason is not None:
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        _reason = f"the CPU has no AVX2/FMA (torch reports {torch.backends.cpu.get_cpu_capability()})"
        return False
    try:
        lib = ctypes.CDLL(str(_build()))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn = lib.nanoseek_gemv
        fn.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        lib.nanoseek_pack16.argtypes = [ptr, i64, ptr, i64, i64]
        lib.nanoseek_pack16.restype = None
        lib.nanoseek_gemm_packed.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
        lib.nanoseek_gemm_packed.restype = None
        lib.nanoseek_moe_packed.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i64, i64, ptr, ctypes.c_int]
        lib.nanoseek_moe_packed.restype = ctypes.c_int
        lib.nanoseek_avx512.argtypes = [ctypes.c_int]
        lib.nanoseek_avx512.restype = ctypes.c_int
        lib.nanoseek_read.argtypes = [ptr, i64, i64]
        lib.nanoseek_read.restype = ctypes.c_float
        _lib, _cdll = fn, lib
        why = _self_check()
    except (OSError, RuntimeError, AttributeError) as e:
        _lib, why = None, str(e)
    if why is not None:
        _lib, _cdll, _reason = None, None, why
        return False
    _bf16_max_rows = BF16_NATIVE_MAX_ROWS if native_bf16() else MAX_ROWS
    _loaded = True
    return True


def _run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if x.stride(1) != 1:
        x = x.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    if b is not None and b.stride(0) != 1:
        b = b.contiguous()
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    rc = _lib(x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), None if b is None else b.data_ptr(),
              y.data_ptr(), N, M, N, K, int(x.dtype == torch.bfloat16), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"gemv failed on {M} rows (out of memory for x in fp32?)")
    return y


@torch.library.custom_op("nanoseek::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _run(x, weight, bias)


@_gemv_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear` takes the kernel for these: loaded, CPU, all bf16 or all fp32, <= MAX_ROWS rows
    (bf16 on a CPU with native bf16: <= BF16_NATIVE_MAX_ROWS), weight rows contiguous, no autograd."""
    if not _loaded or x.device.type != "cpu" or x.dtype not in _DTYPES or weight.dtype != x.dtype:
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.stride(0) != 1):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > MAX_ROWS or x.numel() == 0 or weight.stride(1) != 1:
        return False
    if x.dtype == torch.bfloat16 and rows > _bf16_max_rows:
        return False
    if x.dtype == torch.float32 and (rows > FP32_MAX_ROWS or
                                     weight.numel() < (FP32_MIN_WEIGHT_1 if rows == 1 else FP32_MIN_WEIGHT)):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; a bf16 x of at most MAX_ROWS rows runs on the kernel once `load()` succeeded."""
    return run(x, weight, bias) if fits(x, weight, bias) else F.linear(x, weight, bias)


def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel on x [..., K] once `fits` said yes (fastpath.linear checks once, then calls this)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    return _gemv_op(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
