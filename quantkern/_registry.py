"""Every quantkern operator: schema, fake (meta) implementation and autograd.

This file is the one place where `torch.ops.quantkern.*` is defined. Kernels
register implementations per device elsewhere:

* ``csrc/cpu/<op>.cpp``   TORCH_LIBRARY_IMPL(quantkern, CPU)   (quantkern._C)
* ``csrc/cuda/<op>.cu``   TORCH_LIBRARY_IMPL(quantkern, CUDA)  (quantkern._C)
* ``triton_kernels/<op>.py``  ``quantkern::<op>_triton`` on CUDA, and on CPU
  when ``TRITON_INTERPRET=1``.

The pure-PyTorch reference (quantkern/reference) is never registered here: a
missing kernel must fail loudly, not fall back to the oracle the tests compare
against.
"""
from __future__ import annotations

import torch
from torch.library import Library

LIB = Library("quantkern", "DEF")

# --------------------------------------------------------------------------
# fake_quant_lsq: LSQ+ fake quantization (DESIGN.md section 3)
# --------------------------------------------------------------------------
# ``grad_scale`` is the LSQ gradient scale g; the forward ignores it but carries
# it so that autograd can hand it to the backward.
_LSQ_ARGS = "Tensor x, Tensor scale, Tensor offset, int qmin, int qmax, int? axis=None, int? group_size=None, float grad_scale=1.0"
_LSQ_BWD_ARGS = "Tensor grad, Tensor x, Tensor scale, Tensor offset, int qmin, int qmax, int? axis, int? group_size, float grad_scale"
for _sfx in ("", "_triton"):
    LIB.define(f"fake_quant_lsq{_sfx}({_LSQ_ARGS}) -> Tensor")
    LIB.define(f"fake_quant_lsq_backward{_sfx}({_LSQ_BWD_ARGS}) -> (Tensor, Tensor, Tensor)")

    @torch.library.register_fake(f"quantkern::fake_quant_lsq{_sfx}")
    def _lsq_fake(x, scale, offset, qmin, qmax, axis=None, group_size=None, grad_scale=1.0):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"quantkern::fake_quant_lsq_backward{_sfx}")
    def _lsq_bwd_fake(grad, x, scale, offset, qmin, qmax, axis, group_size, grad_scale):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(scale, memory_format=torch.contiguous_format),
            torch.empty_like(offset, memory_format=torch.contiguous_format),
        )

    def _lsq_setup(ctx, inputs, output):
        x, scale, offset, qmin, qmax, axis, group_size, grad_scale = inputs
        ctx.save_for_backward(x, scale, offset)
        ctx.args = (qmin, qmax, axis, group_size, grad_scale)

    def _make_lsq_backward(bwd_name):
        def _lsq_backward(ctx, grad):
            x, scale, offset = ctx.saved_tensors
            qmin, qmax, axis, group_size, grad_scale = ctx.args
            bwd = getattr(torch.ops.quantkern, bwd_name)
            gx, gs, gb = bwd(grad.contiguous(), x, scale, offset, qmin, qmax, axis, group_size, grad_scale)
            return gx, gs, gb, None, None, None, None, None

        return _lsq_backward

    torch.library.register_autograd(
        f"quantkern::fake_quant_lsq{_sfx}",
        _make_lsq_backward(f"fake_quant_lsq_backward{_sfx}"),
        setup_context=_lsq_setup,
    )


# --------------------------------------------------------------------------
# Packed low-bit weights (DESIGN.md section 4; format: quantkern/reference/packing.py)
# --------------------------------------------------------------------------
# qweight int32 [N, ceil(K/32) * bits]; scales, zeros [N, K // group_size] in
# fp32/fp16/bf16; w = (q - zeros) * scales. ``in_features`` is K (the packed
# rows are padded to a multiple of 32).
LIB.define("pack(Tensor q, int bits) -> Tensor")
LIB.define("unpack(Tensor qweight, int bits, int in_features) -> Tensor")


@torch.library.register_fake("quantkern::pack")
def _pack_fake(q, bits):
    return q.new_empty((q.shape[0], (q.shape[1] + 31) // 32 * bits), dtype=torch.int32)


@torch.library.register_fake("quantkern::unpack")
def _unpack_fake(qweight, bits, in_features):
    return qweight.new_empty((qweight.shape[0], in_features), dtype=torch.uint8)


_PK_ARGS = "Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, int in_features"
for _sfx in ("", "_triton"):
    LIB.define(f"dequantize{_sfx}({_PK_ARGS}, ScalarType? dtype=None) -> Tensor")
    LIB.define(f"packed_linear{_sfx}(Tensor x, {_PK_ARGS}, Tensor? bias=None) -> Tensor")

    @torch.library.register_fake(f"quantkern::dequantize{_sfx}")
    def _dequantize_fake(qweight, scales, zeros, bits, group_size, in_features, dtype=None):
        return scales.new_empty((qweight.shape[0], in_features), dtype=dtype or scales.dtype)

    @torch.library.register_fake(f"quantkern::packed_linear{_sfx}")
    def _packed_linear_fake(x, qweight, scales, zeros, bits, group_size, in_features, bias=None):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    def _pl_setup(ctx, inputs, output):
        x, qweight, scales, zeros, bits, group_size, in_features, bias = inputs
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.args = (bits, group_size, in_features, bias is not None)

    def _make_pl_backward(deq_name):
        def _pl_backward(ctx, grad):
            qweight, scales, zeros = ctx.saved_tensors
            bits, group_size, in_features, has_bias = ctx.args
            gx = gb = None
            if ctx.needs_input_grad[0]:
                deq = getattr(torch.ops.quantkern, deq_name)
                gx = packed_grad_input(grad, qweight, scales, zeros, bits, group_size, in_features, deq)
            if has_bias and ctx.needs_input_grad[7]:
                gb = grad.reshape(-1, grad.shape[-1]).float().sum(0)
            # no gradient for the packed weight, its scales or its zeros
            return gx, None, None, None, None, None, None, gb

        return _pl_backward

    torch.library.register_autograd(
        f"quantkern::packed_linear{_sfx}", _make_pl_backward(f"dequantize{_sfx}"), setup_context=_pl_setup
    )


def packed_grad_input(grad, qweight, scales, zeros, bits, group_size, in_features, dequantize, chunk_bytes=16 << 20):
    """dX = dY @ W for y = x @ W.T, computed from the packed weight.

    W is dequantized (fp32) a block of rows at a time (at most ``chunk_bytes``),
    never whole; accumulation is fp32 and the result has grad's dtype.
    """
    N, K = qweight.shape[0], in_features
    g2 = grad.reshape(-1, N)
    out = torch.zeros((g2.shape[0], K), dtype=torch.float32, device=grad.device)
    step = max(1, chunk_bytes // (4 * K))
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        w = dequantize(qweight[n0:n1], scales[n0:n1], zeros[n0:n1], bits, group_size, K, torch.float32)
        out.addmm_(g2[:, n0:n1].float(), w)
    return out.to(grad.dtype).reshape(*grad.shape[:-1], K)


def op_names() -> list[str]:
    """Names of every quantkern operator, e.g. ``["fake_quant_lsq", ...]``."""
    return sorted(s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("quantkern::"))


def native_op_names() -> list[str]:
    """Operators that quantkern._C must implement on CPU and CUDA (no ``_triton`` suffix)."""
    return [n for n in op_names() if not n.endswith("_triton")]
