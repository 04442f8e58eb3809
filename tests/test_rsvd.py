"""The production randomized SVD against its oracle (`svdfuse.reference.randomized_svd`, which
shares no code with it) and against float64 truth: the Triton projection kernel within torch's own
error, CholeskyQR2 and its certified fallback on hard sketches, the whole SVD on every backend
(`svdfuse.cpu`; Triton on the CPU under TRITON_INTERPRET=1 at small shapes, on CUDA with `-m gpu`)
against Eckart–Young, and the CPU path over storage dtypes, odd shapes, broadcast bases and its
chunking."""

import os
import threading

import pytest
import torch

from svdfuse import _rsvd, cpu, ops, reference

from _helpers import assert_within_torch_error


@pytest.fixture
def rsvd():
    """The Triton backend's module, imported only by the tests that run it."""
    return pytest.importorskip("svdfuse.kernels.rsvd", reason="needs triton")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PROJECT_SHAPES = [(64, 32, 16), (37, 21, 9)]  # (m, n, w): aligned, and odd everywhere


def _randn(*shape, seed=0, dtype=torch.float32, device="cpu", scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def _assert_within_torch_error(out, truth, torch_out, A=None, X=None, base=None, transpose=False):
    """Against torch's fp32 GEMM on the same stored inputs; a `truth` from the oracle
    (`reference.rsvd_project` of A, X, base) is first checked against plain float64 torch."""
    assert out.dtype == torch.float32
    check = None
    if A is not None:
        delta = A.double() if base is None else A.double() - base.double()
        check = (delta.mT if transpose else delta) @ X.double()
    assert_within_torch_error(out, truth, torch_out, truth_check=check)


@pytest.mark.parametrize("m,n,w", PROJECT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("base_shape", [None, "matrix", "per_group"])
def test_rsvd_project_within_torch_error(rsvd, triton_device, m, n, w, dtype, transpose, base_shape):
    G, T = 2, 3
    A = _randn(G, T, m, n, seed=1, dtype=dtype, device=triton_device)
    base = {None: None, "matrix": _randn(m, n, seed=2), "per_group": _randn(G, 1, m, n, seed=2)}[base_shape]
    base = None if base is None else base.to(dtype=dtype, device=triton_device)
    # Ω is shared by every matrix; Q is one per matrix, as in the power iterations.
    X = _randn(m if transpose else n, w, seed=3, device=triton_device) if not transpose else _randn(G, T, m, w, seed=3, device=triton_device)
    out = rsvd.rsvd_project(A, X, base, transpose=transpose)
    truth = reference.rsvd_project(A.double(), X.double(), None if base is None else base.double(), transpose=transpose)
    delta32 = A.float() if base is None else A.float() - base.float()
    torch_out = (delta32.mT if transpose else delta32) @ X
    assert out.shape == truth.shape
    _assert_within_torch_error(out, truth, torch_out, A, X, base, transpose)


@pytest.mark.parametrize("tiling", ["split", "whole"])
@pytest.mark.parametrize("w", [144, 90])
def test_rsvd_project_sketch_tilings(rsvd, triton_device, monkeypatch, tiling, w):
    # W2's sketch (144 columns) as two 128-wide tiles or one 256-wide; 90 columns: not a multiple of
    # 4, so the launcher must not hint the width.
    launches = []
    kernel = rsvd._rsvd_project_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(rsvd, "_rsvd_project_kernel", Recording())
    monkeypatch.setattr(rsvd, "SKETCH_TILING", tiling)
    A, base, X = _randn(2, 21, 19, seed=1, device=triton_device), _randn(21, 19, seed=2, device=triton_device), _randn(19, w, seed=3, device=triton_device)
    out = rsvd.rsvd_project(A, X, base)
    truth = (A.double() - base.double()) @ X.double()
    _assert_within_torch_error(out, truth, (A - base) @ X)
    (grid, kwargs), = launches
    block_w = min(rsvd.SKETCH_TILINGS[tiling], 1 << (w - 1).bit_length())  # power-of-two tiles
    assert grid == (2, -(-w // block_w)) and kwargs["BLOCK_W"] == block_w
    assert block_w == (256 if (tiling, w) == ("whole", 144) else 128)
    assert kwargs["X_ROWS_ALIGNED"] is (w % 4 == 0)


def test_rsvd_project_tf32_rounds_its_inputs_to_nearest(rsvd, triton_device):
    # The kernel rounds (A - base) and X to tf32 itself; the products of the rounded values are
    # then exact, so it must match an fp32 GEMM of the rounded inputs within torch's fp32 error.
    A, base, X = _randn(3, 37, 21, seed=1, device=triton_device), _randn(37, 21, seed=2, device=triton_device), _randn(21, 9, seed=3, device=triton_device)
    out = rsvd.rsvd_project(A, X, base, precision="tf32")
    delta, X_r = reference._round_tf32(A - base), reference._round_tf32(X)
    _assert_within_torch_error(out, delta.double() @ X_r.double(), delta @ X_r)


def test_rsvd_project_tf32x3_within_its_emulation_error(rsvd, triton_device):
    A, base, X = _randn(3, 37, 21, seed=1, device=triton_device), _randn(37, 21, seed=2, device=triton_device), _randn(21, 9, seed=3, device=triton_device)
    out = rsvd.rsvd_project(A, X, base, precision="tf32x3")
    truth = reference.rsvd_project(A.double(), X.double(), base.double())
    _assert_within_torch_error(out, truth, reference.rsvd_project(A, X, base, precision="tf32x3"), A, X, base)


def test_rsvd_project_empty_batch_and_bad_shape(rsvd, triton_device):
    A, X = _randn(0, 5, 4, device=triton_device), _randn(4, 3, device=triton_device)
    assert rsvd.rsvd_project(A, X).shape == (0, 5, 3)
    with pytest.raises(ValueError, match=r"X must be \(\.\.\., 4, w\), found \(5, 3\)"):
        rsvd.rsvd_project(_randn(2, 5, 4, device=triton_device), _randn(5, 3, device=triton_device))


# A stride that fits int32 while twice it does not: index 2 along that dimension lies past 2³¹
# elements. The storage, 2³² + 3 bf16 elements (8 GiB), stays virtual memory on the CPU: only the
# nine viewed elements and the first three, where an int32-wrapped offset lands, are ever written.
_HUGE_STRIDE = 2**31 - 2**20


@pytest.mark.parametrize("operand", ["A", "base"])
@pytest.mark.parametrize("layout", ["rows", "columns"])  # the large stride on m (output rows) or on n (reduction)
def test_rsvd_project_offsets_past_2_31_elements(rsvd, triton_device, operand, layout):
    lead = 2 * (2**31 - _HUGE_STRIDE)  # where the view starts: a wrapped offset reads storage[:3]
    storage = torch.empty(lead + 2 * _HUGE_STRIDE + 3, dtype=torch.bfloat16, device=triton_device)
    storage[:3] = 1e4
    huge = storage.as_strided((3, 3), (_HUGE_STRIDE, 1) if layout == "rows" else (1, _HUGE_STRIDE), lead)
    huge.copy_(_randn(3, 3, seed=1))
    small = _randn(3, 3, seed=2, dtype=torch.bfloat16, device=triton_device)
    A, base = (huge, small) if operand == "A" else (small, huge)
    X = _randn(3, 2, seed=3, device=triton_device)
    out = rsvd.rsvd_project(A, X, base)
    truth = reference.rsvd_project(A.double(), X.double(), base.double())
    _assert_within_torch_error(out, truth, (A.float() - base.float()) @ X, A, X, base)


def _hard_sketches(m=60, w=12):
    """(name, Y) pairs that break plain CholeskyQR: zero, rank-deficient, ill-conditioned, repeated."""
    gen = torch.Generator().manual_seed(4)
    P = torch.linalg.qr(torch.randn(m, w, generator=gen, dtype=torch.float64)).Q
    R = torch.linalg.qr(torch.randn(w, w, generator=gen, dtype=torch.float64)).Q
    graded = (P * torch.logspace(0, -6, w, dtype=torch.float64)) @ R  # κ = 1e6: an fp32 Gram fails
    rank3 = P[:, :3] @ torch.randn(3, w, generator=gen, dtype=torch.float64)
    repeated = torch.cat([P[:, :6], P[:, :6]], dim=1)  # every column twice
    cases = {"well": torch.randn(m, w, generator=gen, dtype=torch.float64), "graded": graded, "rank3": rank3, "zero": torch.zeros(m, w, dtype=torch.float64), "repeated": repeated}
    return list(cases), torch.stack(list(cases.values())).float()


def test_cholesky_qr2_is_orthonormal_and_spans_hard_sketches():
    names, Y = _hard_sketches()
    Q = _rsvd.cholesky_qr2(Y.clone())
    eye = torch.eye(Y.shape[-1], dtype=torch.float64)
    defect = (Q.double().mT @ Q.double() - eye).abs().amax((-2, -1))
    householder = torch.linalg.qr(Y).Q
    ref_defect = (householder.double().mT @ householder.double() - eye).abs().amax((-2, -1))
    residual = (Y.double() - Q.double() @ (Q.double().mT @ Y.double())).flatten(1).norm(dim=1)
    scale = Y.double().flatten(1).norm(dim=1).clamp_min(1e-30)
    eps = torch.finfo(torch.float32).eps
    for i, name in enumerate(names):
        assert defect[i] <= max(2 * ref_defect[i].item(), 16 * eps), (name, defect[i].item(), ref_defect[i].item())
        assert residual[i] <= 64 * eps * scale[i], (name, (residual[i] / scale[i]).item())


def _count_fallbacks(monkeypatch) -> list:
    """Record every batch of sketches `_rsvd.cholesky_qr2` hands to its Householder fallback."""
    fell_back = []
    monkeypatch.setattr(_rsvd, "householder", lambda Yb: fell_back.append(Yb.clone()) or torch.linalg.qr(Yb).Q)
    return fell_back


def test_cholesky_qr2_falls_back_to_householder_only_where_cholesky_cannot(monkeypatch):
    names, Y = _hard_sketches()
    fell_back = _count_fallbacks(monkeypatch)
    _rsvd.cholesky_qr2(Y.clone())
    taken = {names[i] for Yb in fell_back for i in range(len(names)) for y in Yb if torch.equal(y, Y[i])}
    # fp64 Grams carry the κ = 1e6 sketch; only a basis that must be completed falls back.
    assert taken == {"rank3", "zero", "repeated"}


@pytest.mark.parametrize("shape", [(3, 40, 10), (2, 2, 37, 29), (1, 7, 7), (0, 9, 4)])
def test_lu_basis_is_p_l_of_the_sketch(shape):
    # P L of torch's LU, permuted exactly: Y = basis U, entries of at most 1, unit "diagonal" rows.
    Y = torch.randn(shape, generator=torch.Generator().manual_seed(21)).mT.contiguous().mT  # as the CPU's products leave it
    basis = _rsvd.lu_basis(Y)
    P, L, U = torch.linalg.lu(Y)
    assert basis.shape == Y.shape
    assert torch.equal(basis, P @ L)
    scale = Y.abs().amax().item() if Y.numel() else 0.0
    torch.testing.assert_close(basis @ U, Y, atol=8 * Y.shape[-2] * torch.finfo(Y.dtype).eps * scale, rtol=0)


def test_lu_basis_of_a_zero_or_rank_deficient_sketch_has_full_rank():
    # What it adds beyond Y's span are coordinate directions: still a basis for the next product.
    gen = torch.Generator().manual_seed(22)
    Y = torch.stack([torch.zeros(30, 8), torch.randn(30, 2, generator=gen) @ torch.randn(2, 8, generator=gen)])
    basis = _rsvd.lu_basis(Y).double()
    assert (torch.linalg.cond(basis) < 30).all(), torch.linalg.cond(basis)
    assert torch.equal(_rsvd.lu_basis(Y[:1]), torch.eye(30, 8).unsqueeze(0))
    within = basis @ torch.linalg.lstsq(basis, Y.double()).solution  # Y lies in the span
    torch.testing.assert_close(within, Y.double(), atol=1e-5, rtol=0)


def test_cholesky_qr2_nan_stays_visible():
    Y = _randn(2, 20, 5)
    Y[1, 3, 2] = float("nan")
    Q = _rsvd.cholesky_qr2(Y)
    assert Q[1].isnan().any() and not Q[0].isnan().any()


def _product(U, S, V):
    """U diag(S) Vᵀ: compares factorizations free of the signs of singular vectors."""
    return (U * S.unsqueeze(-2)) @ V.mT


def _planted(batch, m, n, spectra, seed=0):
    """float64 matrices with given singular values (a list per matrix), and a dense base."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(batch, m, n, dtype=torch.float64)
    for b, s in enumerate(spectra):
        s = torch.as_tensor(s, dtype=torch.float64)
        U = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, len(s), generator=gen, dtype=torch.float64)).Q
        out[b] = (U * s) @ V.T
    return out, torch.randn(m, n, generator=gen, dtype=torch.float64)


@pytest.fixture(params=["cpu", "triton", pytest.param("triton-cuda", marks=pytest.mark.gpu)])
def backend(request):
    """(randomized_svd, device) of a production backend: `svdfuse.cpu`, and the Triton kernels on
    the CPU under TRITON_INTERPRET=1 and on CUDA (`-m gpu`)."""
    if request.param == "cpu":
        return cpu.randomized_svd, torch.device("cpu")
    rsvd = pytest.importorskip("svdfuse.kernels.rsvd", reason="needs triton")
    if request.param == "triton-cuda":
        return rsvd.randomized_svd, request.getfixturevalue("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels run on the CPU only under TRITON_INTERPRET=1")
    return rsvd.randomized_svd, torch.device("cpu")


def _svd(backend, A, rank, base, **options):
    """The backend's randomized SVD of `A - base` (moved to its device), returned on the CPU."""
    randomized_svd, device = backend
    options = {"oversample": 8, "power_iters": 3, "seed": 0, **options}
    out = randomized_svd(A.to(device), rank, None if base is None else base.to(device), **options)
    return tuple(t.cpu() for t in out)


def test_randomized_svd_matches_eckart_young_on_task_like_spectra(backend):
    m, n, rank = 48, 40, 6
    decay = torch.arange(1, 41, dtype=torch.float64) ** -1.5
    delta, base = _planted(3, m, n, [decay, 2 * decay, 0.5 * decay], seed=5)
    U, S, V = (t.double() for t in _svd(backend, (base + delta).float(), rank, base.float()))
    exact = torch.linalg.svdvals(delta)
    optimum = exact[:, rank:].square().sum(-1).sqrt()
    error = (delta - (U * S.unsqueeze(-2)) @ V.mT).flatten(1).norm(dim=1)
    assert torch.all(error <= 1.02 * optimum), error / optimum
    torch.testing.assert_close(S, exact[:, :rank], rtol=1e-3, atol=0)
    eye = torch.eye(rank, dtype=torch.float64).expand(3, -1, -1)
    torch.testing.assert_close(U.mT @ U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(V.mT @ V, eye, atol=1e-5, rtol=0)


def test_randomized_svd_zero_rank_deficient_and_repeated(backend):
    m, n, rank = 40, 30, 6
    delta, base = _planted(3, m, n, [[3.0, 2.0, 1.0], [], [2.0] * 4], seed=6)
    U, S, V = (t.double() for t in _svd(backend, (base + delta).float(), rank, base.float()))
    expected = torch.tensor([[3.0, 2.0, 1.0, 0, 0, 0], [0.0] * 6, [2.0] * 4 + [0, 0]], dtype=torch.float64)
    torch.testing.assert_close(S, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((U * S.unsqueeze(-2)) @ V.mT, delta, atol=1e-5, rtol=0)
    eye = torch.eye(rank, dtype=torch.float64).expand(3, -1, -1)  # completed orthonormally, even where σ = 0
    torch.testing.assert_close(U.mT @ U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(V.mT @ V, eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_randomized_svd_reads_low_precision_sources(backend, dtype):
    delta, base = _planted(2, 33, 27, [[4.0, 2.0, 1.0, 0.5]] * 2, seed=7)
    A, B = (base + delta).to(dtype), base.to(dtype)
    U, S, V = _svd(backend, A, 4, B)
    assert S.dtype == torch.float32
    truth = torch.linalg.svdvals(A.double() - B.double())[:, :4]  # of the stored values
    torch.testing.assert_close(S.double(), truth, rtol=1e-4, atol=1e-5)


def test_randomized_svd_is_deterministic_per_seed(backend):
    delta, base = _planted(2, 30, 20, [[3.0, 1.0]] * 2, seed=8)
    A, B = (base + delta).float(), base.float()
    first, second, other = _svd(backend, A, 2, B, seed=3), _svd(backend, A, 2, B, seed=3), _svd(backend, A, 2, B, seed=4)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_backend_agrees_with_reference(backend):
    # The same algorithm and seed: the backends differ only by rounding.
    delta, base = _planted(2, 37, 29, [[5.0, 3.0, 2.0, 1.0, 0.5]] * 2, seed=9)
    A, B = (base + delta).float(), base.float()
    ref = reference.randomized_svd(A, 5, B, oversample=4, power_iters=2, seed=0)
    out = _svd(backend, A, 5, B, oversample=4, power_iters=2)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_product(*out), _product(*ref), rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_truncated_svd_on_cuda_runs_the_kernels(rsvd, cuda, dtype):
    delta, base = _planted(4, 768, 768, [torch.arange(1, 200, dtype=torch.float64) ** -1.0] * 4, seed=10)
    A, B = (base + delta).to(dtype).to(cuda), base.to(dtype).to(cuda)
    U, S, V = ops.truncated_svd(A, 76, base=B, method="randomized")
    expected = rsvd.randomized_svd(
        A, 76, B, oversample=ops.DEFAULT_OVERSAMPLE, power_iters=ops.DEFAULT_POWER_ITERS, seed=0, precision=ops.DEFAULT_PRECISION
    )
    for got, want in zip((U, S, V), expected):
        assert torch.equal(got, want)
    truth = torch.linalg.svdvals(A.double() - B.double())[:, :76]
    optimum = torch.linalg.svdvals(A.double() - B.double())[:, 76:].square().sum(-1).sqrt()
    error = ((A.double() - B.double()) - (U.double() * S.double().unsqueeze(-2)) @ V.double().mT).flatten(1).norm(dim=1)
    assert torch.all(error <= 1.02 * optimum), error / optimum
    # The smallest kept σ of a flat spectrum converge slowest (bench/README.md): the measured bound.
    assert ((S.double() - truth).abs() / truth).max() < 5e-2


# The CPU path (`svdfuse.cpu`): against the reference oracle (same Ω, same algorithm: rounding
# apart), against float64 truth, and through the front door.

STORAGE = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CPU_SHAPES = [(48, 40), (37, 29), (29, 37)]  # aligned-ish, odd tall, odd wide


def _rounding(dtype, m, n):
    """Rounding of one randomized SVD relative to σ₁, from the accumulation dtype of `dtype`
    storage: products of length up to max(m, n), γ = max(m, n)·eps."""
    return max(m, n) * torch.finfo(reference.compute_dtype(dtype)).eps


@pytest.fixture(params=["as it runs", "one matrix", "two matrices"])
def chunking(request, monkeypatch):
    """How the CPU path cuts the batch, applied for (m, n) matrices in `acc`: as it runs (small
    matrices in one chunk, one op per row of the batch); one matrix per chunk and one row per
    conversion block; two matrices per chunk, straddling the rows of three sources."""

    def apply(m, n, acc):
        if request.param == "one matrix":
            monkeypatch.setattr(cpu, "_CHUNK_BYTES", 1)
            monkeypatch.setattr(cpu, "_BLOCK_BYTES", 1)
        elif request.param == "two matrices":
            monkeypatch.setattr(cpu, "_CHUNK_BYTES", 2 * m * n * torch.finfo(acc).bits // 8)

    return apply


def _slow(m, n, count, seed):
    """Task matrices whose σ_j = j^-1/2 decay slowly (every power iteration moves σ_rank by far
    more than rounding), each its own scale, and a base 20× their size."""
    decay = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -0.5
    delta, base = _planted(count, m, n, [decay * (1 + i) for i in range(count)], seed=seed)
    return delta, 20 * base


BASE_LAYOUTS = {  # name: (A's batch, base's batch or None); the result's batch is (2, 3)
    "none": ((2, 3), None),
    "matrix": ((2, 3), ()),
    "per group": ((2, 3), (2, 1)),
    "both broadcast": ((1, 3), (2, 1)),
}


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("m,n", CPU_SHAPES)
@pytest.mark.parametrize("layout", list(BASE_LAYOUTS))
def test_cpu_path_matches_the_reference_oracle(chunking, dtype, m, n, layout):
    a_batch, b_batch = BASE_LAYOUTS[layout]
    delta, base = _slow(m, n, 6, seed=11)
    base = None if b_batch is None else base.expand(2, 1, m, n)[(0,) * (2 - len(b_batch)) + (slice(None),) * len(b_batch)]
    A = delta.reshape(2, 3, m, n)[: a_batch[0]] + (0 if base is None else base)
    A, base = A.to(dtype), None if base is None else base.to(dtype)
    acc = reference.compute_dtype(dtype)
    chunking(m, n, acc)
    options = dict(oversample=4, power_iters=2, seed=0)
    U, S, V = cpu.randomized_svd(A, 5, base, **options)
    Ur, Sr, Vr = reference.randomized_svd(A, 5, base, **options)
    assert (U.shape, S.shape, V.shape) == ((2, 3, m, 5), (2, 3, 5), (2, 3, n, 5))
    assert U.dtype == S.dtype == V.dtype == acc
    scale = _rounding(dtype, m, n) * Sr[..., :1]  # σ moves by at most the perturbation's norm
    error = (S - Sr).abs()
    assert (error <= 8 * scale).all(), f"σ off the oracle by {(error / Sr[..., :1]).max():.3g} σ₁ > {8 * scale.max() / Sr.max():.3g}"
    # Products: the subspace moves by rounding / relative gap; σ_5 - σ_6 ≈ 0.04 σ₁ here.
    gap = 5**-0.5 - 6**-0.5
    product_error = (_product(U, S, V) - _product(Ur, Sr, Vr)).abs().amax((-2, -1))
    assert (product_error <= 8 * scale[..., 0] / gap).all(), (product_error / Sr[..., 0]).max()


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("m,n", CPU_SHAPES)
def test_cpu_path_against_float64_truth(dtype, m, n):
    # At the front door's defaults, on task-like spectra: the accuracy targets of DESIGN.md §4.
    rank = 6
    decay = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -1.5
    delta, base = _planted(3, m, n, [decay, 2 * decay, 0.5 * decay], seed=12)
    A, B = (base + delta).to(dtype), base.to(dtype)
    U, S, V = (t.double() for t in ops.truncated_svd(A, rank, base=B, method="randomized"))
    Ut, St, Vht = torch.linalg.svd(A.double() - B.double())  # truth: of the stored values
    optimum = St[:, rank:].square().sum(-1).sqrt()
    error = ((A.double() - B.double()) - _product(U, S, V)).flatten(1).norm(dim=1)
    assert torch.all(error <= 1.02 * optimum), error / optimum
    torch.testing.assert_close(S, St[:, :rank], rtol=1e-3, atol=0)
    eps = _rounding(dtype, m, n)
    eye = torch.eye(rank, dtype=torch.float64).expand(3, -1, -1)
    torch.testing.assert_close(U.mT @ U, eye, atol=8 * eps, rtol=0)
    torch.testing.assert_close(V.mT @ V, eye, atol=8 * eps, rtol=0)
    # Subspaces, up to sign: the leading three are separated by gaps of ≥ 0.18 σ₁.
    for F, T in ((U, Ut), (V, Vht.mT)):
        cos = (F[..., :3] * T[..., :3]).sum(-2).abs()
        assert ((1 - cos) <= 1e-3).all(), 1 - cos


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_path_on_an_ill_conditioned_input(dtype):
    # σ from 1 down to 1e-7 across the sketch: every σ within rounding of σ₁, U and V orthonormal.
    m, n, rank = 40, 30, 10
    delta, base = _planted(2, m, n, [torch.logspace(0, -7, 16, dtype=torch.float64)] * 2, seed=13)
    A, B = (base + delta).to(dtype), base.to(dtype)
    U, S, V = (t.double() for t in cpu.randomized_svd(A, rank, B, oversample=6, power_iters=3, seed=0))
    truth = torch.linalg.svdvals(A.double() - B.double())[:, :rank]
    eps = _rounding(dtype, m, n)
    assert ((S - truth).abs() <= 8 * eps * truth[:, :1]).all(), ((S - truth).abs() / truth[:, :1]).max()
    eye = torch.eye(rank, dtype=torch.float64).expand(2, -1, -1)
    torch.testing.assert_close(U.mT @ U, eye, atol=8 * eps, rtol=0)
    torch.testing.assert_close(V.mT @ V, eye, atol=8 * eps, rtol=0)


def test_cpu_path_with_cholesky_qr2_falls_back_where_it_must_and_stays_correct(monkeypatch):
    # CholeskyQR2 is the GPU's orthonormalization and the CPU's alternative: through the CPU
    # driver, a zero or rank-deficient matrix falls back, a full-rank one never, and every
    # result is exact where the matrix is. (Rank-deficient as
    # stored, so without a base: fp32 rounding of base + Δ makes Δ full rank at ~1e-6, which
    # CholeskyQR2 with fp64 Grams rightly carries.)
    monkeypatch.setattr(cpu, "ORTHONORMALIZE", _rsvd.cholesky_qr2)
    monkeypatch.setattr(cpu, "NORMALIZE", None)  # every sketch's basis by CholeskyQR2
    fell_back = _count_fallbacks(monkeypatch)
    m, n, rank, q = 40, 30, 6, 2
    decay = torch.arange(1, 31, dtype=torch.float64) ** -1.0
    delta, base = _planted(3, m, n, [decay, [3.0, 2.0], []], seed=14)
    expected = torch.linalg.svdvals(delta.float().double())[:, :rank]
    for i, name in enumerate(["full rank", "rank 2", "zero"]):
        fell_back.clear()
        A, B = (delta[i], None) if name == "rank 2" else ((base + delta[i]).float(), base.float())
        U, S, V = (t.double() for t in cpu.randomized_svd(A.float(), rank, B, oversample=4, power_iters=q, seed=0))
        # A rank-2 matrix stored in fp32 is full rank at rounding level: each sketch holds its
        # other directions at κ ≈ 1e7, which fp64 Grams may carry or not, as the products' order
        # of summation rounds them; certified or fallen back, the results below are exact. Zero:
        # every time.
        expected_fallbacks = {"full rank": [0], "rank 2": range(0, 2 + 2 * q), "zero": [1 + 2 * q]}[name]
        assert len(fell_back) in expected_fallbacks, (name, len(fell_back))
        eps = _rounding(torch.float32, m, n)
        atol = 1e-3 * expected[i, 0].item() if name == "full rank" else 8 * eps * max(1.0, expected[i, 0].item())
        torch.testing.assert_close(S, expected[i], atol=atol, rtol=0)
        eye = torch.eye(rank, dtype=torch.float64)  # completed orthonormally, even where σ = 0
        torch.testing.assert_close(U.mT @ U, eye, atol=8 * eps, rtol=0)
        torch.testing.assert_close(V.mT @ V, eye, atol=8 * eps, rtol=0)


@pytest.mark.parametrize("dtype", STORAGE)
def test_truncated_svd_on_cpu_runs_the_cpu_path(dtype):
    delta, base = _slow(37, 29, 4, seed=15)
    A, B = (base + delta).to(dtype), base.to(dtype)
    got = ops.truncated_svd(A, 5, base=B, method="randomized")
    want = cpu.randomized_svd(A, 5, B, oversample=ops.DEFAULT_OVERSAMPLE, power_iters=ops.DEFAULT_POWER_ITERS, seed=0)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # tf32 inputs are a GPU's: on the CPU their emulation is the reference's.
    if dtype == torch.float32:
        emulated = ops.truncated_svd(A, 5, base=B, method="randomized", precision="tf32")
        options = dict(oversample=ops.DEFAULT_OVERSAMPLE, power_iters=ops.DEFAULT_POWER_ITERS, seed=0, precision="tf32")
        for g, w in zip(emulated, reference.randomized_svd(A, 5, B, **options)):
            assert torch.equal(g, w)


def _fresh_thread_default() -> int:
    """torch's thread count as a thread started now sees it."""
    seen = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    return seen[0]


@pytest.mark.parametrize("chunk", [None, 2 * 37 * 29 * 4])
def test_cpu_path_gives_the_same_bytes_on_any_thread_count(monkeypatch, chunk):
    # Chunks are shared among torch's threads, each on one thread: the thread count may not change
    # a byte (a chunk's products and factorizations are the same ops on any), and the caller's
    # thread settings are as they were. (How the batch is cut may round differently: it is the
    # same for a given call whatever the threads.)
    delta, base = _slow(37, 29, 6, seed=16)
    A, B = (base + delta).reshape(2, 3, 37, 29).float(), base.float()
    if chunk is not None:
        monkeypatch.setattr(cpu, "_CHUNK_BYTES", chunk)  # two matrices a chunk: three chunks
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            # worked on in place, and converted chunk by chunk
            runs.append([cpu.randomized_svd(A, 5, b, oversample=4, power_iters=2, seed=0) for b in (None, B)])
            assert torch.get_num_threads() == _fresh_thread_default() == count
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_cpu_path_raises_a_chunk_error_with_threads_restored(monkeypatch):
    monkeypatch.setattr(cpu, "_CHUNK_BYTES", 12 * 10 * 4)  # a chunk a matrix, on two threads: the third fails
    calls = []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == 3:
            raise RuntimeError("chunk failed")
        return _rsvd_driver(*args, **kwargs)

    _rsvd_driver = _rsvd.randomized_svd
    monkeypatch.setattr(_rsvd, "randomized_svd", failing)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="chunk failed"):
            cpu.randomized_svd(torch.randn(4, 12, 10), 3, None, oversample=2, power_iters=1, seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_cpu_path_empty_batch():
    U, S, V = cpu.randomized_svd(torch.zeros(0, 7, 5), 2, torch.zeros(7, 5), oversample=2, power_iters=1, seed=0)
    assert U.shape == (0, 7, 2) and S.shape == (0, 2) and V.shape == (0, 5, 2)
