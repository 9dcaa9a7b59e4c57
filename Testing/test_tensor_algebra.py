"""t-product algebra: checked against the definitions (block-circulant matrix, per-frequency SVD), not against itself."""

from __future__ import annotations

import pytest
import torch

from TensorPEFTLib.adapters.tensor_algebra import (
    f_diagonal,
    t_identity,
    t_pinv,
    t_product,
    t_product_circulant,
    t_product_thin,
    t_svd,
    t_svd_product,
    t_transpose,
    truncated_t_svd,
)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _bcirc_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kilmer & Martin's definition written out: fold(bcirc(A) · unfold(B)), built with explicit loops."""
    n, n1, n2 = a.shape
    n3 = b.shape[2]
    bcirc = torch.zeros(n * n1, n * n2, dtype=a.dtype)
    for i in range(n):
        for j in range(n):
            bcirc[i * n1:(i + 1) * n1, j * n2:(j + 1) * n2] = a[(i - j) % n]
    unfold_b = torch.cat([b[k] for k in range(n)], dim=0)  # (n·n2, n3)
    return (bcirc @ unfold_b).reshape(n, n1, n3)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("n", [1, 4, 5])
@pytest.mark.parametrize("product", [t_product, t_product_circulant, t_product_thin])
def test_t_product_equals_block_circulant_definition(n: int, product) -> None:
    a, b = _rand(n, 3, 4, seed=1), _rand(n, 4, 2, seed=2)
    assert _rel(product(a, b), _bcirc_product(a, b)) < 1e-12


def test_t_product_identity_and_transpose_rules() -> None:
    a, b = _rand(6, 3, 4, seed=3), _rand(6, 4, 5, seed=4)
    assert torch.allclose(t_product(a, t_identity(6, 4, dtype=a.dtype)), a, atol=1e-12)
    # (A * B)ᵀ = Bᵀ * Aᵀ holds only with slices 1..n-1 reversed: a plain per-slice transpose fails this.
    assert _rel(t_transpose(t_product(a, b)), t_product(t_transpose(b), t_transpose(a))) < 1e-12
    assert t_transpose(a)[1].equal(a[5].T)


@pytest.mark.parametrize("n", [1, 2, 5, 6])  # odd and even: bin n/2 exists only for even n
@pytest.mark.parametrize("shape", [(7, 4), (4, 7)])
def test_full_rank_t_svd_reconstructs_with_real_factors(n: int, shape: tuple[int, int]) -> None:
    a = _rand(n, *shape, seed=5)
    u, s, v = t_svd(a)
    k = min(shape)
    assert u.shape == (n, shape[0], k) and s.shape == (n, k) and v.shape == (n, shape[1], k)
    assert not (u.is_complex() or s.is_complex() or v.is_complex())
    # Through the definition (block-circulant products), not through the FFT the factors came from.
    rebuilt = _bcirc_product(_bcirc_product(u, f_diagonal(s)), t_transpose(v))
    assert _rel(rebuilt, a) <= 1e-6
    assert _rel(t_svd_product(u, s, v), a) <= 1e-6
    # t-orthogonality of the economy factors: Uᵀ * U = I.
    assert torch.allclose(t_product(t_transpose(u), u), t_identity(n, k, dtype=a.dtype), atol=1e-10)


def test_full_t_svd_has_square_orthogonal_factors() -> None:
    a = _rand(4, 5, 3, seed=6)
    u, s, v = t_svd(a, full=True)
    assert u.shape == (4, 5, 5) and v.shape == (4, 3, 3)
    assert _rel(t_product(t_product(u, f_diagonal(s, 5, 3)), t_transpose(v)), a) <= 1e-6
    assert torch.allclose(t_product(t_transpose(v), v), t_identity(4, 3, dtype=a.dtype), atol=1e-10)


def test_truncated_t_svd_is_the_best_tubal_rank_r_approximation() -> None:
    n, r = 6, 2
    a = _rand(n, 8, 5, seed=7)
    u, s, v = truncated_t_svd(a, r)
    assert u.shape == (n, 8, r) and s.shape == (n, r) and v.shape == (n, 5, r)
    approx = t_svd_product(u, s, v)
    # Eckart-Young per frequency: each bin's error is exactly its discarded singular values.
    sigma = torch.linalg.svdvals(torch.fft.fft(a, dim=0))  # (n, 5), all n bins
    err_hat = torch.fft.fft(a - approx, dim=0)
    assert torch.allclose(torch.linalg.matrix_norm(err_hat) ** 2, (sigma[:, r:] ** 2).sum(dim=1), rtol=1e-8)


def test_randomized_truncated_t_svd_matches_exact_on_a_decaying_spectrum() -> None:
    n, r = 6, 2
    u0, s0, v0 = t_svd(_rand(n, 40, 30, seed=8))
    decay = torch.logspace(0, -4, 30, dtype=torch.float64)
    a = t_product(t_product(u0, f_diagonal(_delta_tubes(decay, n))), t_transpose(v0))
    exact = t_svd_product(*truncated_t_svd(a, r))
    fast = t_svd_product(*truncated_t_svd(a, r, power_iters=4))
    assert _rel(fast, exact) < 1e-6


@pytest.mark.parametrize("shape", [(7, 40, 25), (6, 25, 40)])
def test_exact_truncation_is_the_top_of_every_svd_on_a_flat_spectrum(shape: tuple[int, int, int]) -> None:
    """The default truncation (Gram eigenvectors, then the projected SVD) against every singular triplet from LAPACK,
    on random float32 weights (no decaying spectrum), tall and wide slices, odd and even n (real and complex bins);
    and an all-zero tensor (rank-deficient) gives finite zero factors."""
    a = _rand(*shape, seed=11).float()
    r = 3
    u, s, v = truncated_t_svd(a, r)
    assert u.dtype == s.dtype == v.dtype == torch.float32
    uf, sf, vf = t_svd(a.double())
    expected = t_svd_product(uf[..., :r], sf[:, :r], vf[..., :r])
    assert _rel(t_svd_product(u.double(), s.double(), v.double()), expected) < 1e-6
    u, s, v = truncated_t_svd(torch.zeros(shape), r)
    assert all(torch.isfinite(x).all() for x in (u, s, v)) and not s.any()


def _delta_tubes(values: torch.Tensor, n: int) -> torch.Tensor:
    """Diagonal tubes whose every Fourier bin equals ``values`` (a delta tube): spectrum ``values`` at all bins."""
    tubes = torch.zeros(n, values.numel(), dtype=values.dtype)
    tubes[0] = values
    return tubes


def test_t_pseudo_inverse() -> None:
    a = _rand(5, 4, 6, seed=9)
    p = t_pinv(a)
    assert p.shape == (5, 6, 4)
    assert _rel(t_product(t_product(a, p), a), a) < 1e-10
    assert _rel(t_product(t_product(p, a), p), p) < 1e-10
    square = _rand(4, 3, 3, seed=10)
    assert torch.allclose(t_product(square, t_pinv(square)), t_identity(4, 3, dtype=square.dtype), atol=1e-9)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        t_product(_rand(3, 2, 4), _rand(3, 5, 2))
    with pytest.raises(ValueError, match="3-way"):
        t_svd(_rand(3, 4))
    with pytest.raises(ValueError, match="rank"):
        truncated_t_svd(_rand(3, 4, 2), 3)


def test_circulant_backward_repeats_bit_for_bit_with_two_threads():
    """The plain index b[shift] backpropagated as a scatter-add whose order varied with 2 threads (the same gradient
    twice differed by 2e-4 on LoRA-PT's 48 x 768 x 768 stack at rank 4); the gather-and-sum backward repeats."""
    from TensorPEFTLib.adapters.tensor_algebra import t_product_circulant

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(48, 768, 4, generator=gen)
        b = torch.randn(48, 4, 768, generator=gen, requires_grad=True)
        weight = torch.randn(48, 768, 768, generator=gen)
        grads = [torch.autograd.grad((t_product_circulant(a, b) * weight).sum(), b)[0] for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
