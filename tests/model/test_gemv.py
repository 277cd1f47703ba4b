"""model/gemv.py's kernel against its reference, F.linear (bf16: in fp32 on the same bf16 values)."""
import pytest
import torch
import torch.nn.functional as F

from nanoseek.model import gemv
from nanoseek.model.fastpath import linear

pytestmark = pytest.mark.skipif(not gemv.load(), reason=f"gemv kernel unavailable: {gemv.reason()}")


@pytest.fixture(autouse=True)
def every_row_count(monkeypatch):
    """The kernel's bf16 rows, whatever this CPU's dispatch (a native-bf16 CPU gives F.linear the
    products past BF16_NATIVE_MAX_ROWS rows): the tests check the kernel at every row count."""
    monkeypatch.setattr(gemv, "_bf16_max_rows", gemv.MAX_ROWS)


def reference(x, w, b=None):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def close(got, want):
    """bf16 output of an fp32 sum: within 2 bf16 ulps of the fp32 reference (or a tiny absolute)."""
    return bool(((got.float() - want).abs() <= 2 * 2.0 ** -7 * want.abs() + 1e-2).all())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 19])
@pytest.mark.parametrize("n,k", [(1, 8), (7, 13), (64, 96), (257, 1000)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    assert gemv.fits(x, w, b)
    got = gemv.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert close(got, reference(x, w, b))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_matches_f_linear(rows, bias, monkeypatch):
    """fp32 weights (every register-blocked row count; 1 row only past FP32_MIN_WEIGHT_1, lowered here)."""
    monkeypatch.setattr(gemv, "FP32_MIN_WEIGHT_1", gemv.FP32_MIN_WEIGHT)
    g = torch.Generator().manual_seed(rows)
    n, k = 257, 2 ** 17 // 257 + 3                                     # tails of N and K, >= FP32_MIN_WEIGHT
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    assert gemv.fits(x, w, b)
    got = gemv.linear(x, w, b)
    assert got.dtype == torch.float32
    assert torch.allclose(got, F.linear(x.double(), w.double(), None if b is None else b.double()).float(),
                          rtol=1e-5, atol=1e-4)


def test_fp32_takes_the_kernel_only_where_it_measured_faster():
    big, small = torch.randn(768, 320), torch.randn(96, 320)
    assert gemv.fits(torch.randn(2, 320), big, None)
    assert gemv.fits(torch.randn(gemv.FP32_MAX_ROWS, 320), big, None)
    assert not gemv.fits(torch.randn(gemv.FP32_MAX_ROWS + 1, 320), big, None)   # MKL's GEMM again
    assert not gemv.fits(torch.randn(1, 320), big, None)                          # MKL's gemv at 1 row
    assert not gemv.fits(torch.randn(2, 320), small, None)                        # the call costs more
    assert not gemv.fits(torch.randn(2, 320), big.bfloat16(), None)               # mixed dtypes


def test_strided_inputs_and_leading_dims():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, 70, generator=g).bfloat16()[:, 3:67]           # row stride 70
    x = torch.randn(1, 2, 64 * 2, generator=g).bfloat16()[..., ::2]      # non-contiguous last dim
    got = gemv.linear(x, w)
    assert got.shape == (1, 2, 50)
    assert close(got, reference(x, w))


def test_threads_agree():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(1, 512, generator=g).bfloat16(), torch.randn(333, 512, generator=g).bfloat16()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv.linear(x, w)
        torch.set_num_threads(2)
        two = gemv.linear(x, w)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)          # each output is one thread's sum: same order, same bits


def test_what_stays_on_f_linear():
    x, w = torch.randn(gemv.MAX_ROWS + 1, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    assert not gemv.fits(x, w, None)                                  # more than MAX_ROWS rows
    assert not gemv.fits(x[:1].float(), w.float(), None)              # fp32, 1 row, a small weight
    wg = w.clone().requires_grad_()
    assert not gemv.fits(x[:1], wg, None)                             # autograd needs F.linear
    with torch.no_grad():
        assert gemv.fits(x[:1], wg, None)
    assert not gemv.fits(x[:1], w.t().contiguous().t(), None)         # column-major weight


def test_fastpath_linear_routes_decode_rows_and_backward_still_works():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 40, generator=g).bfloat16().requires_grad_()
    x = torch.randn(1, 40, generator=g).bfloat16()
    with torch.no_grad():
        assert close(linear(x, w), reference(x, w))
    linear(x, w).float().sum().backward()                             # F.linear's autograd
    assert w.grad is not None and torch.allclose(w.grad.float(), x.float().expand(24, 40))


def test_inside_torch_compile():
    g = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(64, 96, generator=g).bfloat16()
    b1 = torch.randn(96, generator=g).bfloat16()

    def f(x):
        return linear(F.silu(linear(x, w1, b1)), w2)

    x = torch.randn(2, 64, generator=g).bfloat16()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    with torch.no_grad():
        assert torch.equal(compiled(x), f(x))


def test_bad_build_is_reported_not_used(monkeypatch, tmp_path):
    """A kernel that cannot be built leaves F.linear in place and says why."""
    monkeypatch.setattr(gemv, "_loaded", False)
    monkeypatch.setattr(gemv, "_lib", None)
    monkeypatch.setattr(gemv, "_cdll", None)
    monkeypatch.setattr(gemv, "_reason", None)
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(gemv, "SOURCE", bad)
    assert gemv.load() is False
    assert "failed on bad.c" in gemv.reason()
    x, w = torch.randn(1, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    assert not gemv.fits(x, w, None)
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_bench_gemv_json_micro(capsys):
    """`nanoseek bench gemv --json` on micro sizes: one object, every point measured, the kernel agreeing."""
    import json

    from nanoseek.cli import main
    assert main(["bench", "gemv", "--json", "--shapes", "64x48", "--rows", "1,9,70", "--seconds", "0.01",
                 "--ring-mb", "1"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["bench"] == "gemv" and r["figures"]["memory_bandwidth_gb_s"] > 0
    assert set(r["ratios"]) == {"64x48_rows1_vs_f_linear", "64x48_rows9_vs_f_linear", "64x48_rows70_vs_f_linear"}
    assert r["figures"]["64x48_rows1_on_kernel"] == 1.0 and r["figures"]["64x48_rows70_on_kernel"] == 0.0
    assert all(r["figures"][f"64x48_rows{m}_max_rel_err"] < 2e-2 for m in (1, 9, 70))


def test_bench_gemv_fp32_micro(capsys):
    import json

    from nanoseek.cli import main
    assert main(["bench", "gemv", "--json", "--dtype", "float32", "--shapes", "512x256", "--rows", "1,2",
                 "--seconds", "0.01", "--ring-mb", "1"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["config"]["dtype"] == "float32"
    assert r["figures"]["512x256_rows2_on_kernel"] == 1.0 and r["figures"]["512x256_rows1_on_kernel"] == 0.0
    assert all(r["figures"][f"512x256_rows{m}_max_rel_err"] < 1e-5 for m in (1, 2))


def test_bf16_rows_go_to_torch_where_the_cpu_multiplies_bf16_natively(monkeypatch):
    """With AVX512-BF16 / AMX, torch's bf16 GEMM beats the AVX2 kernel past BF16_NATIVE_MAX_ROWS rows
    (gemv.py's table), so load() hands them to F.linear there; elsewhere the kernel takes up to MAX_ROWS."""
    w = torch.randn(64, 96).bfloat16()
    many = torch.randn(gemv.BF16_NATIVE_MAX_ROWS + 1, 96).bfloat16()
    few = torch.randn(gemv.BF16_NATIVE_MAX_ROWS, 96).bfloat16()
    for native in (True, False):
        monkeypatch.setattr(gemv, "native_bf16", lambda native=native: native)
        monkeypatch.setattr(gemv, "_loaded", False)
        assert gemv.load()
        assert gemv.fits(few, w, None)
        assert gemv.fits(many, w, None) is (not native)
        assert gemv.fits(torch.randn(4, 96), w.float(), None) is False      # fp32 rules unchanged (small weight)
        assert torch.equal(gemv.linear(many, w), gemv.run(many, w) if not native else F.linear(many, w))
