"""model/packed.py: the packed GEMM and MoE against their references (F.linear in float64, the looped
experts), the packs following in-place weight updates, and where the model's modules take them."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model import gemv, native, packed
from nanoseek.model.fastpath import run_linear
from nanoseek.model.moe import Experts, experts_auto, experts_looped

pytestmark = pytest.mark.skipif(not gemv.load(), reason=f"gemv kernel unavailable: {gemv.reason()}")


def close(got, want, tol=1e-5):
    return bool(((got.double() - want).abs() <= tol * (1 + want.abs().max())).all())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 12, 13, 16, 32])
@pytest.mark.parametrize("n,k", [(1, 3), (37, 29), (16, 64), (300, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(rows, n, k, bias):
    """Every 6-row chunk remainder, panel tails (N % 16), odd K, bias."""
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    p = packed.pack(w)
    assert p.numel() == -(-n // 16) * 16 * k
    got = packed.linear(x, w, p, b)
    assert got.shape == (rows, n) and close(got, F.linear(x.double(), w.double(), None if b is None else b.double()))


def test_strided_x_leading_dims_and_threads():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 48, generator=g)
    p = packed.pack(w)
    x = torch.randn(3, 4, 60, generator=g)[..., 5:53]        # rows strided, leading dims
    want = F.linear(x.double(), w.double())
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(packed.linear(x, w, p))
    finally:
        torch.set_num_threads(threads)
    assert outs[0].shape == (3, 4, 70) and close(outs[0], want)
    assert torch.equal(outs[0], outs[1])                      # panels split among threads: same sums


def test_a_pack_follows_in_place_updates_of_its_weight():
    """An optimizer step, load_state_dict or LLM.update_weights writes the weight in place: the next
    eager product packs it again (its version counter moved); compiled code on native.py's ops
    after refresh() (what engine/graphs.py calls at every step), which packs again what changed."""
    lin = nn.Linear(64, 1024)
    assert packed.attach(lin) > 0 and lin.packed_weight is not None
    assert "packed_weight" not in lin.state_dict()            # not persistent: checkpoints never see it
    x = torch.randn(4, 64)
    step = torch.compile(run_linear, dynamic=False)

    def refreshed(m, x):
        packed.refresh(m)
        return step(m, x)
    with torch.no_grad():
        for f in (run_linear, refreshed):
            assert close(f(lin, x), F.linear(x.double(), lin.weight.double(), lin.bias.double()))
        before = step(lin, x)
        lin.weight.mul_(-2)                                    # in place: same tensor, new version
        lin.load_state_dict({"weight": torch.randn(1024, 64), "bias": lin.bias})
        if native.available():                                 # the C++ op does not check: refresh() must
            assert torch.equal(step(lin, x), before)
        for f in (refreshed, run_linear):
            assert close(f(lin, x), F.linear(x.double(), lin.weight.double(), lin.bias.double()))


def test_forget_catches_writes_that_leave_the_version_alone():
    """`.data` writes (and torch's fused AdamW) do not bump the version: the pack stays as it was
    until forget() (LLM.update_weights() calls it)."""
    lin = nn.Linear(64, 1024)
    packed.attach(lin)
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = run_linear(lin, x)
        lin.weight.data.mul_(-1)
        assert torch.equal(run_linear(lin, x), before)                 # the stale pack: why forget exists
        packed.forget(lin)
        assert close(run_linear(lin, x), F.linear(x.double(), lin.weight.double(), lin.bias.double()))


def test_what_stays_off_the_packs():
    lin = nn.Linear(64, 1024)
    packed.attach(lin)
    tiny = nn.Linear(32, 64)
    assert packed.attach(tiny) == 0 and getattr(tiny, "packed_weight", None) is None      # < MIN_WEIGHT_NATIVE
    small = nn.Linear(64, 256)                  # packed for compiled steps (native ops), eager stays on MKL
    assert (packed.attach(small) > 0) == native.available()
    if native.available():
        assert not packed.fits(torch.randn(2, 64), small.weight, small.packed_weight)
    x = torch.randn(4, 64, requires_grad=True)
    assert not packed.fits(x, lin.weight, lin.packed_weight)                       # autograd: F.linear
    run_linear(lin, x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    with torch.no_grad():
        assert not packed.fits(torch.randn(packed.MAX_ROWS + 1, 64), lin.weight, lin.packed_weight)
        assert not packed.fits(torch.randn(4, 64).bfloat16(), lin.weight, lin.packed_weight)
        assert packed.fits(torch.randn(packed.MAX_ROWS, 64), lin.weight, lin.packed_weight)
    assert packed.attach(nn.Linear(64, 1024), max_bytes=1000) == 0                  # all or nothing


@pytest.mark.parametrize("E,H,I,K", [(8, 256, 128, 2), (16, 320, 96, 4), (4, 32, 8, 1)])
@pytest.mark.parametrize("N", [1, 2, 3, 5, 16, 32])
def test_moe_matches_looped_experts(E, H, I, K, N):
    g = torch.Generator().manual_seed(E * 100 + N)
    ex = Experts(E, H, I)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g) * 0.05)
        ex.down_proj.copy_(torch.randn(E, H, I, generator=g) * 0.05)
    ex.register_buffer("packed_gate_up", packed.pack(ex.gate_up_proj), persistent=False)
    ex.register_buffer("packed_down", packed.pack(ex.down_proj), persistent=False)
    x = torch.randn(N, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=g)
    with torch.no_grad():
        want = experts_looped(ex, x, idx, w)
        assert packed.moe_fits(ex, x)
        got = packed.moe(ex, x, idx, w)
        assert close(got, want.double(), 1e-5)
        assert close(experts_auto(ex, x, idx, w), want.double(), 1e-5)        # eager decode takes the packs
        ex.down_proj.mul_(0.5)                                                  # in place: packed again
        assert close(packed.moe(ex, x, idx, w), experts_looped(ex, x, idx, w).double(), 1e-5)


def test_moe_refuses_a_bad_expert_index():
    ex = Experts(4, 32, 8)
    ex.register_buffer("packed_gate_up", packed.pack(ex.gate_up_proj.detach().normal_()), persistent=False)
    ex.register_buffer("packed_down", packed.pack(ex.down_proj.detach().normal_()), persistent=False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="expert index"):
        packed.moe(ex, torch.randn(2, 32), torch.tensor([[0], [4]]), torch.ones(2, 1))


def test_moe_inside_torch_compile():
    torch.manual_seed(0)
    ex = Experts(8, 64, 16)
    nn.init.normal_(ex.gate_up_proj, std=0.1)
    nn.init.normal_(ex.down_proj, std=0.1)
    ex.register_buffer("packed_gate_up", packed.pack(ex.gate_up_proj), persistent=False)
    ex.register_buffer("packed_down", packed.pack(ex.down_proj), persistent=False)
    x = torch.randn(16, 64)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(16)])
    w = torch.rand(16, 2)
    f = torch.compile(experts_auto, dynamic=False, fullgraph=True)   # 16 x 2 > 8: past the gathered path
    with torch.no_grad():
        assert close(f(ex, x, idx, w), experts_looped(ex, x, idx, w).double(), 1e-5)


def test_bench_gemv_packed_micro(capsys):
    import json

    from nanoseek.cli import main
    assert main(["bench", "gemv", "--json", "--dtype", "float32", "--packed", "--shapes", "512x256",
                 "--rows", "1,16", "--seconds", "0.01", "--ring-mb", "1"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(r["figures"][f"512x256_rows{m}_max_rel_err_packed"] < 1e-5 for m in (1, 16))
    assert r["ratios"]["512x256_rows16_packed_vs_f_linear"] > 0
    assert main(["bench", "gemv", "--packed"]) == 2                  # bf16 weights are not packed


# ------------------------------------------------------------------ native.py's C++ ops
native_only = pytest.mark.skipif(not native.load(), reason=f"native ops unavailable: {native.reason()}")


@native_only
@pytest.mark.parametrize("rows", [1, 2, 7, 32])
@pytest.mark.parametrize("n,k", [(37, 29), (300, 130)])
def test_native_gemm_is_the_python_ops_kernel(rows, n, k):
    """The C++ op calls the same kernel as the Python op (packed._run): bit-identical, bias or not."""
    g = torch.Generator().manual_seed(rows + n)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    p = packed.pack(w)
    for bias in (None, b):
        got = torch.ops.nanoseek_native.gemm_packed(x, p, bias, n)
        assert torch.equal(got, packed._run(x, w, p, bias))
        assert close(got, F.linear(x.double(), w.double(), None if bias is None else bias.double()))
    one = torch.randn(k + 40, generator=g).as_strided((1, k), (7, 1))   # a 1-row view as inductor passes them
    assert torch.equal(torch.ops.nanoseek_native.gemm_packed(one, p, None, n), packed._run(one.contiguous(), w, p, None))


@native_only
@pytest.mark.parametrize("N", [1, 5, 32])
def test_native_moe_is_the_python_ops_kernel(N):
    g = torch.Generator().manual_seed(N)
    ex = Experts(16, 64, 32)
    with torch.no_grad():
        ex.gate_up_proj.normal_(generator=g)
        ex.down_proj.normal_(generator=g)
    pg, pd = packed.pack(ex.gate_up_proj), packed.pack(ex.down_proj)
    x = torch.randn(N, 64, generator=g)
    idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(N)])
    w = torch.rand(N, 4, generator=g)
    with torch.no_grad():
        got = torch.ops.nanoseek_native.moe_packed(x, idx, w, pg, pd, 16, 32)
        # experts are split among threads, each adding into its own y: equal up to summation order
        assert close(got, packed._moe(x, idx, w, ex.gate_up_proj, ex.down_proj, pg, pd).double(), 1e-6)
        assert close(got, experts_looped(ex, x, idx, w).double(), 1e-4)


@native_only
def test_native_ops_refuse_bad_input():
    w = torch.randn(20, 8)
    p = packed.pack(w)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.nanoseek_native.gemm_packed(torch.randn(2, 8).double(), p, None, 20)
    with pytest.raises(RuntimeError, match="does not hold"):
        torch.ops.nanoseek_native.gemm_packed(torch.randn(2, 8), p, None, 40)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.nanoseek_native.gemm_packed(torch.randn(2, 8), p, torch.randn(3), 20)
    ex = Experts(4, 32, 16)
    pg, pd = packed.pack(ex.gate_up_proj.detach()), packed.pack(ex.down_proj.detach())
    with pytest.raises(RuntimeError, match="expert index"):
        torch.ops.nanoseek_native.moe_packed(torch.randn(2, 32), torch.tensor([[0], [4]]), torch.ones(2, 1), pg, pd, 4, 16)
    with pytest.raises(RuntimeError, match="do not hold"):
        torch.ops.nanoseek_native.moe_packed(torch.randn(2, 32), torch.tensor([[0], [1]]), torch.ones(2, 1), pg, pd, 8, 16)


@native_only
def test_compiled_steps_call_the_native_ops():
    """Traced products of packed weights (small ones too) become the C++ ops in the graph."""
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward
    lin = nn.Linear(64, 256)
    ex = Experts(8, 64, 16)
    nn.init.normal_(ex.gate_up_proj, std=0.1)
    nn.init.normal_(ex.down_proj, std=0.1)
    packed.attach(lin)
    packed.attach(ex)
    x, idx, w = torch.randn(16, 64), torch.stack([torch.randperm(8)[:2] for _ in range(16)]), torch.rand(16, 2)
    with torch.no_grad():
        y = torch.compile(run_linear, backend=backend, fullgraph=True)(lin, x[:2])
        z = torch.compile(experts_auto, backend=backend, fullgraph=True)(ex, x, idx, w)
    assert "nanoseek_native.gemm_packed" in seen and "nanoseek_native.moe_packed" in seen, seen
    assert close(y, F.linear(x[:2].double(), lin.weight.double(), lin.bias.double()))
    assert close(z, experts_looped(ex, x, idx, w).double(), 1e-5)


@native_only
def test_refresh_packs_again_what_changed_and_only_that():
    a, b = nn.Linear(64, 256), nn.Linear(64, 256)
    model = nn.Sequential(a, b)
    packed.attach(model)
    x = torch.randn(2, 64)
    with torch.no_grad():
        a.weight.mul_(2)
        pb = b.packed_weight.clone()
        packed.refresh(model)
        assert close(torch.ops.nanoseek_native.gemm_packed(x, a.packed_weight, None, 256), F.linear(x.double(), a.weight.double()))
        assert torch.equal(b.packed_weight, pb)
        b.weight.data.mul_(-1)                                 # no version bump: refresh cannot see it
        packed.refresh(model)
        assert torch.equal(b.packed_weight, pb)
        packed.forget(model)
        packed.refresh(model)
        assert close(torch.ops.nanoseek_native.gemm_packed(x, b.packed_weight, None, 256), F.linear(x.double(), b.weight.double()))


@pytest.mark.parametrize("rows", [4, 5, 8, 13, 16, 25, 32])
def test_avx512_block_is_bit_identical_to_the_avx2_one(rows):
    """gemv.c's AVX-512 block (4 rows and more, where the CPU has AVX-512F) runs the same FMAs in the
    same order as the AVX2 6x16 block: GEMM (panel tails, bias) and MoE outputs equal bit for bit,
    through the ctypes library and the C++ operators alike."""
    if not gemv.avx512(True):
        pytest.skip("no AVX-512F on this CPU")
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 130, generator=g), torch.randn(300, 130, generator=g), torch.randn(300, generator=g)
    p = packed.pack(w)
    E, H, I, K = 4, 64, 32, 2                        # ~rows / 2 tokens an expert: the block runs there too
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) * 0.05, torch.randn(E, H, I, generator=g) * 0.05
    pg, pd = packed.pack(gate_up), packed.pack(down)
    xm = torch.randn(rows, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(rows)])
    wt = torch.rand(rows, K, generator=g)
    gemms, moes = [], []
    try:
        for on in (True, False):
            gemv.avx512(on)
            gemms.append(packed.linear(x, w, p, b))
            moes.append(packed._moe(xm, idx, wt, gate_up, down, pg, pd))
            if native.load():
                native.avx512(on)
                gemms.append(torch.ops.nanoseek_native.gemm_packed(x, p, b, 300))
                moes.append(torch.ops.nanoseek_native.moe_packed(xm, idx, wt, pg, pd, E, I))
    finally:
        gemv.avx512(True)
        if native.load():
            native.avx512(True)
    assert all(torch.equal(gemms[0], y) for y in gemms) and all(torch.equal(moes[0], y) for y in moes)
    assert close(gemms[0], F.linear(x.double(), w.double(), b.double()))
    ref = sum(wt[:, j, None] * torch.stack([F.linear(F.silu(F.linear(xm[n], gate_up[idx[n, j], :I])) *
                                                     F.linear(xm[n], gate_up[idx[n, j], I:]), down[idx[n, j]])
                                            for n in range(rows)]) for j in range(K))
    assert close(moes[0], ref.double())
