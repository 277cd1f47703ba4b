"""`nanoseek bench gemv`: model/gemv.py's kernel vs torch's F.linear on the same weights (bf16, or
fp32 with --dtype float32; the kernel is timed wherever it runs, `<key>_on_kernel` says whether
gemv.linear takes it there).

For each weight shape (default: R1-Distill-Qwen-1.5B's gate/up, down and lm_head) and row count
(default 1, 2, 8, 16, 64), the two alternate on a ring of weight copies larger than the caches, so
every call reads its weights from memory. Figures: GB/s of weights read per call and GFLOP/s, each
side, and the memory bandwidth one thread reads in the same run (bench/engine.py's memory_bandwidth:
the fastest of 1-8 streams side by side; model/gemv.py's table came from this loop). Ratios (> 1: the kernel is faster): `<shape>_rows<M>_vs_f_linear`.

    nanoseek bench gemv --json [--threads 0] [--shapes 8960x1536,1536x8960] [--rows 1,8] [--seconds 0.5]
    nanoseek bench gemv --dtype float32 --shapes 768x320,1024x320 --rows 1,2,4,8 --ring-mb 24
    nanoseek bench gemv --dtype float32 --packed --shapes 2048x256,512x256 --rows 1,2,16 --ring-mb 32

--packed (fp32) also times model/packed.py's GEMM on packs of the same weights (its table came from
this loop): `<shape>_rows<M>_packed_vs_f_linear`.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from nanoseek.bench.common import report

DEFAULT_SHAPES = "8960x1536,1536x8960,151936x1536"     # out x in: gate/up, down, lm_head of the 1.5B shape


def add_arguments(p):
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="weight shapes OUTxIN, comma-separated")
    p.add_argument("--rows", default="1,2,8,16,64", help="rows of x, comma-separated")
    p.add_argument("--seconds", type=float, default=0.5, help="time per side per point")
    p.add_argument("--ring-mb", type=int, default=256, help="bytes of weight copies cycled through (beyond the caches)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights and x")
    p.add_argument("--packed", action="store_true", help="fp32: also time packed.py's GEMM on packed weights")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _rate(f, x, ws, seconds: float) -> float:
    """Seconds per call, cycling through the ring of weights."""
    f(x, ws[0])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for w in ws:
            f(x, w)
        n += len(ws)
    return (time.perf_counter() - t0) / n


def main(args) -> int:
    from nanoseek.bench.engine import memory_bandwidth
    from nanoseek.model import gemv, packed
    if args.packed and args.dtype != "float32":
        print("--packed takes fp32 weights (--dtype float32)")
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not gemv.load():
        print(f"the gemv kernel is not available here: {gemv.reason()}")
        return 1
    figures, ratios = {"memory_bandwidth_gb_s": memory_bandwidth(0.5) / 1e9}, {}
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.lower().split("x"))
        copies = max(2, (args.ring_mb << 20) // (N * K * size))
        ws = [torch.randn(N, K, generator=g).to(dtype) for _ in range(min(copies, 64))]
        packs = {id(w): packed.pack(w) for w in ws} if args.packed else {}
        for M in (int(r) for r in args.rows.split(",")):
            kernel = gemv.run if M <= gemv.MAX_ROWS else gemv.linear      # past MAX_ROWS: F.linear on both sides
            x = torch.randn(M, K, generator=g).to(dtype)
            want = F.linear(x.double(), ws[0].double())
            err = float(((kernel(x, ws[0]).double() - want).abs() / (1 + want.abs())).max())
            kernel_path = gemv.fits(x, ws[0], None)
            t = {}
            with torch.inference_mode():
                for _ in range(2):                               # interleaved: the machine's speed drifts
                    t["f"] = _rate(F.linear, x, ws, args.seconds)
                    t["k"] = _rate(kernel, x, ws, args.seconds)
                    if packs and M <= packed.MAX_ROWS:
                        t["p"] = _rate(lambda x, w: packed.linear(x, w, packs[id(w)]), x, ws, args.seconds)
            key = f"{N}x{K}_rows{M}"
            figures.update({f"{key}_gb_s": N * K * size / t["k"] / 1e9,
                            f"{key}_gb_s_f_linear": N * K * size / t["f"] / 1e9,
                            f"{key}_gflop_s": 2 * M * N * K / t["k"] / 1e9,
                            f"{key}_gflop_s_f_linear": 2 * M * N * K / t["f"] / 1e9,
                            f"{key}_max_rel_err": err, f"{key}_on_kernel": float(kernel_path)})
            ratios[f"{key}_vs_f_linear"] = t["f"] / t["k"]
            if "p" in t:
                p_err = float(((packed.linear(x, ws[0], packs[id(ws[0])]).double() - want).abs() / (1 + want.abs())).max())
                figures.update({f"{key}_gflop_s_packed": 2 * M * N * K / t["p"] / 1e9, f"{key}_max_rel_err_packed": p_err})
                ratios[f"{key}_packed_vs_f_linear"] = t["f"] / t["p"]
    config = {"threads": torch.get_num_threads(), "shapes": args.shapes, "rows": args.rows, "dtype": args.dtype,
              "max_rows": gemv.MAX_ROWS, "cpu": torch.backends.cpu.get_cpu_capability()}
    report("gemv", config, figures, ratios, args.json)
    return 0
