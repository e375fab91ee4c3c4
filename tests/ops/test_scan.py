import pytest
import torch

from ratplus.ops.scan import gated_scan, gated_scan_reference


def _inputs(shape, dtype=torch.float64, seed=0, h0=True):
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(shape, generator=gen, dtype=dtype).requires_grad_()
    x = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()
    s = torch.randn(shape[:-2] + shape[-1:], generator=gen, dtype=dtype).requires_grad_() if h0 else None
    return g, x, s


@pytest.mark.parametrize("T", [1, 2, 3, 17, 64, 65, 257])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_matches_loop_outputs_and_grads(T, with_h0):
    g, x, h0 = _inputs((2, 3, T, 5), h0=with_h0)
    inputs = [t for t in (g, x, h0) if t is not None]
    ref = gated_scan_reference(g, x, h0)
    out = gated_scan(g, x, h0, backend="chunked")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, inputs, up)
    g_out = torch.autograd.grad(out, inputs, up)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    g, x, h0 = _inputs((1, 2, 11, 3))
    assert torch.autograd.gradcheck(lambda g, x, h0: gated_scan(g, x, h0), (g, x, h0))


def test_float32_and_extreme_gates():
    # gates near 0 and 1 must not overflow (the chunked form multiplies gates, never divides)
    gen = torch.Generator().manual_seed(1)
    g = torch.sigmoid(torch.randn(1, 2, 300, 4, generator=gen) * 30)
    x = torch.randn(1, 2, 300, 4, generator=gen)
    out = gated_scan(g, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, gated_scan_reference(g, x), rtol=1e-5, atol=1e-5)


def test_recurrence_semantics():
    g = torch.full((1, 1, 3, 1), 0.5)
    x = torch.tensor([2.0, 4.0, 8.0]).view(1, 1, 3, 1)
    # h0 = 0: 1, 0.5 + 2 = 2.5, 1.25 + 4 = 5.25
    assert torch.allclose(gated_scan(g, x).flatten(), torch.tensor([1.0, 2.5, 5.25]))


def test_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        gated_scan(torch.rand(1, 1, 4, 2), torch.rand(1, 1, 5, 2))
    with pytest.raises(ValueError, match="h0"):
        gated_scan(torch.rand(1, 1, 4, 2), torch.rand(1, 1, 4, 2), torch.rand(1, 2))
    with pytest.raises(ValueError, match="backend"):
        gated_scan(torch.rand(1, 1, 4, 2), torch.rand(1, 1, 4, 2), backend="triton9")


@pytest.mark.parametrize("T", [1, 5, 36, 37])
def test_linear_scan_reverse_equals_flipped_forward(T):
    from ratplus.ops.scan import linear_scan

    gen = torch.Generator().manual_seed(T)
    a = torch.rand(2, 3, T, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 3, T, 4, generator=gen, dtype=torch.float64)
    h0 = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    expected = linear_scan(a.flip(-2), b.flip(-2), h0).flip(-2)
    torch.testing.assert_close(linear_scan(a, b, h0, reverse=True), expected, rtol=1e-12, atol=1e-12)


def test_strided_inputs_match_contiguous():
    # the model scans heads transposed out of a (B, T, C) projection without copying them
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(2, 40, 3, 4, generator=gen).transpose(1, 2)
    x = torch.randn(2, 40, 3, 4, generator=gen).transpose(1, 2)
    assert not x.is_contiguous()
    torch.testing.assert_close(gated_scan(g, x), gated_scan_reference(g.contiguous(), x.contiguous()))


@pytest.mark.slow
@pytest.mark.parametrize("with_h0", [False, True])
def test_compiled_scan_matches_reference_outputs_and_grads(with_h0):
    g, x, h0 = _inputs((1, 2, 50, 4), dtype=torch.float32, h0=with_h0)
    inputs = [t for t in (g, x, h0) if t is not None]
    ref = gated_scan_reference(g, x, h0)
    out = gated_scan(g, x, h0, backend="compiled")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    up = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, inputs, up), torch.autograd.grad(ref, inputs, up), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["chunked", "compiled"])
def test_cuda_scan_matches_cpu_reference(backend):
    g, x, h0 = _inputs((2, 4, 300, 64), dtype=torch.float32)
    ref = gated_scan_reference(g, x, h0)
    up = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (g, x, h0), up)
    gc, xc, hc = (t.detach().cuda().requires_grad_() for t in (g, x, h0))
    out = gated_scan(gc, xc, hc, backend=backend)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(torch.autograd.grad(out, (gc, xc, hc), up.cuda()), ref_grads, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-3)
