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

import math
import types

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
# oscillation_update: fused, in-place oscillation tracking + freezing
# (Nagel et al. 2022; DESIGN.md section 3; state layout in csrc/shared/oscillation.h)
# --------------------------------------------------------------------------
# Mutates weight (frozen weights are reset to q_frozen * s + beta), meta and ema.
# Returns int64 [2]: (oscillations this step, weights frozen after this step).
_OSC_ARGS = (
    "Tensor(a!) weight, Tensor scale, Tensor offset, Tensor(b!) meta, Tensor(c!) ema, int qmin, int qmax, "
    "int? axis, int? group_size, float momentum, float freeze_threshold"
)
# dampening_loss: norm * sum((q*s + beta).detach() - clamp(w, s*qmin + beta, s*qmax + beta))^2, 0-d fp32.
# Differentiable in weight only (not scale/offset), as in the paper.
_DAMP_ARGS = "Tensor weight, Tensor scale, Tensor offset, int qmin, int qmax, int? axis, int? group_size, float norm"
for _sfx in ("", "_triton"):
    LIB.define(f"oscillation_update{_sfx}({_OSC_ARGS}) -> Tensor")
    LIB.define(f"dampening_loss{_sfx}({_DAMP_ARGS}) -> Tensor")
    LIB.define(f"dampening_loss_backward{_sfx}(Tensor grad, {_DAMP_ARGS}) -> Tensor")

    @torch.library.register_fake(f"quantkern::oscillation_update{_sfx}")
    def _osc_fake(weight, scale, offset, meta, ema, qmin, qmax, axis, group_size, momentum, freeze_threshold):
        return weight.new_empty((2,), dtype=torch.int64)

    @torch.library.register_fake(f"quantkern::dampening_loss{_sfx}")
    def _damp_fake(weight, scale, offset, qmin, qmax, axis, group_size, norm):
        return scale.new_empty(())

    @torch.library.register_fake(f"quantkern::dampening_loss_backward{_sfx}")
    def _damp_bwd_fake(grad, weight, scale, offset, qmin, qmax, axis, group_size, norm):
        return torch.empty_like(weight, memory_format=torch.contiguous_format)

    def _damp_setup(ctx, inputs, output):
        weight, scale, offset, qmin, qmax, axis, group_size, norm = inputs
        ctx.save_for_backward(weight, scale, offset)
        ctx.args = (qmin, qmax, axis, group_size, norm)

    def _make_damp_backward(bwd_name):
        def _damp_backward(ctx, grad):
            weight, scale, offset = ctx.saved_tensors
            bwd = getattr(torch.ops.quantkern, bwd_name)
            # No gradient to scale/offset: the target (q*s + beta) is detached and the clamp
            # bounds are treated as constants (Nagel et al. 2022, eq. 6).
            return bwd(grad, weight, scale, offset, *ctx.args), None, None, None, None, None, None, None

        return _damp_backward

    torch.library.register_autograd(
        f"quantkern::dampening_loss{_sfx}",
        _make_damp_backward(f"dampening_loss_backward{_sfx}"),
        setup_context=_damp_setup,
    )
# hqq_quantize: the HQQ zero-point solver, fused (DESIGN.md section 3)
# --------------------------------------------------------------------------
# W [N, K] float32/float16/bfloat16 -> (q uint8 [N, K], scale fp32 [N, K // g],
# zero fp32 [N, K // g]), W ~= (q - zero) * scale. See quantkern/reference/hqq.py.
_HQQ_ARGS = (
    "Tensor W, int bits, int group_size, int axis=1, float lp_norm=0.7, float beta=10.0, "
    "float kappa=1.01, int iters=20, str early_stop=\"global\""
)
for _sfx in ("", "_triton"):
    LIB.define(f"hqq_quantize{_sfx}({_HQQ_ARGS}) -> (Tensor, Tensor, Tensor)")

    @torch.library.register_fake(f"quantkern::hqq_quantize{_sfx}")
    def _hqq_fake(W, bits, group_size, axis=1, lp_norm=0.7, beta=10.0, kappa=1.01, iters=20, early_stop="global"):
        torch._check(W.dim() == 2, lambda: f"quantkern: W must be 2-D [N, K], got {W.dim()}-D")
        N, K = W.shape
        return (
            W.new_empty((N, K), dtype=torch.uint8),
            W.new_empty((N, K // group_size), dtype=torch.float32),
            W.new_empty((N, K // group_size), dtype=torch.float32),
        )

    # Quantization is not differentiable: the outputs never require grad, even
    # when W does (and backward through them is an error, not a silent zero).
    def _hqq_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output)

    def _hqq_backward(ctx, *grads):
        raise RuntimeError("quantkern.hqq_quantize is not differentiable")

    torch.library.register_autograd(f"quantkern::hqq_quantize{_sfx}", _hqq_backward, setup_context=_hqq_setup)
# --------------------------------------------------------------------------
# calib_histogram / calib_search: the histogram calibrators (quantkern/ptq/calibrate.py;
# semantics: quantkern/reference/calibrate.py; math: csrc/shared/calibrate.h)
# --------------------------------------------------------------------------
# calib_histogram: x [C, M] float32/float16/bfloat16; pos, neg int64 [C, B] updated in
# place (bin trunc(|x| * n / R) in fp32, clamped to n - 1; x < 0 -> neg); R float32 [C],
# n int64 [C] (n <= B). Channels with R <= 0 are skipped.
# calib_search: pos, neg int64 [C, B]; width float64 [C] (0 = no data: (0, 0)); n int64 [C]
# -> (amin float64 [C], amax float64 [C]) of method "entropy" or "mse".
for _sfx in ("", "_triton"):
    LIB.define(f"calib_histogram{_sfx}(Tensor x, Tensor(a!) pos, Tensor(b!) neg, Tensor R, Tensor n) -> ()")
    LIB.define(
        f"calib_search{_sfx}(Tensor pos, Tensor neg, Tensor width, Tensor n, str method, int num_bits, "
        "bool unsigned, bool symmetric, int stride, int start_bin) -> (Tensor, Tensor)"
    )

    @torch.library.register_fake(f"quantkern::calib_histogram{_sfx}")
    def _calib_hist_fake(x, pos, neg, R, n):
        return None

    @torch.library.register_fake(f"quantkern::calib_search{_sfx}")
    def _calib_search_fake(pos, neg, width, n, method, num_bits, unsigned, symmetric, stride, start_bin):
        torch._check(pos.dim() == 2, lambda: f"quantkern: pos must be 2-D [C, B], got {pos.dim()}-D")
        C = pos.shape[0]
        return pos.new_empty((C,), dtype=torch.float64), pos.new_empty((C,), dtype=torch.float64)


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
        for name, t in (("scales", scales), ("zeros", zeros)):  # (as _packed_linear_fake: mixed devices)
            if t.device != qweight.device:
                raise ValueError(f"quantkern.dequantize: {name} is on {t.device} but qweight is on {qweight.device}")
        return scales.new_empty((qweight.shape[0], in_features), dtype=dtype or scales.dtype)

    @torch.library.register_fake(f"quantkern::packed_linear{_sfx}")
    def _packed_linear_fake(x, qweight, scales, zeros, bits, group_size, in_features, bias=None):
        # a direct op call mixing devices (e.g. one meta tensor among CPU ones) lands here: refuse it
        # as the real kernels do, instead of returning an uninitialised tensor
        for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
            if t is not None and t.device != x.device:
                raise ValueError(f"quantkern.packed_linear: {name} is on {t.device} but x is on {x.device}")
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
                gb = grad.reshape(_rows(grad), grad.shape[-1]).float().sum(0)
            # no gradient for the packed weight, its scales or its zeros
            return gx, None, None, None, None, None, None, gb

        return _pl_backward

    # the native op's autograd is registered in C++ (csrc/cpu/packed_linear.cpp: a Python
    # wrapper here would run on every call, no_grad included); the Triton op keeps this one
    if _sfx:
        torch.library.register_autograd(
            f"quantkern::packed_linear{_sfx}", _make_pl_backward(f"dequantize{_sfx}"), setup_context=_pl_setup
        )


# dX = dY W of the native packed_linear (its bias gradient is a plain sum), an op of its own so
# that torch.compile's backward graph runs its kernel (on the CPU: the same bits for any thread
# count) rather than a traced dequantize + addmm; d(dX)/d(dY) applied to u is packed_linear(u, W).
LIB.define(f"packed_linear_backward(Tensor grad, {_PK_ARGS}) -> Tensor")


@torch.library.register_fake("quantkern::packed_linear_backward")
def _packed_linear_backward_fake(grad, qweight, scales, zeros, bits, group_size, in_features):
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t.device != grad.device:
            raise ValueError(f"quantkern.packed_linear_backward: {name} is on {t.device} but grad is on {grad.device}")
    return grad.new_empty((*grad.shape[:-1], in_features))


def _plb_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:4])
    ctx.args = inputs[4:]


def _plb_backward(ctx, g):
    qweight, scales, zeros = ctx.saved_tensors
    bits, group_size, in_features = ctx.args
    gg = None
    if ctx.needs_input_grad[0]:
        gg = torch.ops.quantkern.packed_linear(g, qweight, scales, zeros, bits, group_size, in_features)
    return gg, None, None, None, None, None, None


torch.library.register_autograd("quantkern::packed_linear_backward", _plb_backward, setup_context=_plb_setup)


def _fold_vmap_rule(op_name: str):
    """A vmap rule for ``packed_linear`` / ``packed_linear_backward``: a batch of the first tensor (x, or
    dY) alone is moved to the front and folded into the op's leading dims, one kernel call (functorch's
    generic fallback, which the raw op met under ``torch.compile`` of ``vmap``, ran one call per sample
    and warned); a batched weight, scales, zeros or bias runs one call per sample."""
    def rule(info, in_dims, first, qweight, scales, zeros, bits, group_size, in_features, *bias):
        op = getattr(torch.ops.quantkern, op_name)
        tensors = (first, qweight, scales, zeros, *bias)
        if all(d is None for d in in_dims[1:]):
            return op(first.movedim(in_dims[0], 0), qweight, scales, zeros, bits, group_size, in_features, *bias), 0

        if info.batch_size == 0:  # (torch.stack of no samples fails)
            from ._functorch import _empty_batch

            return _empty_batch(types.SimpleNamespace(apply=op), in_dims,
                                (first, qweight, scales, zeros, bits, group_size, in_features, *bias))

        def pick(t, d, i):
            return t if d is None or t is None else t.select(d, i)

        outs = [op(*(pick(t, d, i) for t, d in zip(tensors[:4], in_dims[:4])), bits, group_size, in_features,
                   *(pick(t, d, i) for t, d in zip(tensors[4:], in_dims[7:])))
                for i in range(info.batch_size)]
        return torch.stack(outs), 0

    return rule


torch.library.register_vmap("quantkern::packed_linear", _fold_vmap_rule("packed_linear"))
torch.library.register_vmap("quantkern::packed_linear_backward", _fold_vmap_rule("packed_linear_backward"))

# The bias gradient of the native packed_linear, an op of its own for the same reason: grad
# [..., N] summed over every leading dim, fp32 [N]; on the CPU each column's rows in order, in
# double (ATen's sum splits rows by thread count when there are few columns).
LIB.define("packed_linear_bias_backward(Tensor grad) -> Tensor")


@torch.library.register_fake("quantkern::packed_linear_bias_backward")
def _packed_linear_bias_backward_fake(grad):
    if grad.dim() < 1:
        raise RuntimeError("quantkern.packed_linear_bias_backward: grad must have at least 1 dim")  # as the kernels
    return grad.new_empty((grad.shape[-1],), dtype=torch.float32)


def _plbb_setup(ctx, inputs, output):
    ctx.shape, ctx.dtype = inputs[0].shape, inputs[0].dtype


def _plbb_backward(ctx, g):
    return g.to(ctx.dtype).expand(ctx.shape) if ctx.needs_input_grad[0] else None


torch.library.register_autograd("quantkern::packed_linear_bias_backward", _plbb_backward, setup_context=_plbb_setup)


def _rows(t: torch.Tensor):
    """Product of all but the last size of ``t`` (symbolic under torch.compile)."""
    return math.prod(t.shape[:-1])


def packed_grad_input(grad, qweight, scales, zeros, bits, group_size, in_features, dequantize, chunk_bytes=16 << 20):
    """dX = dY @ W for y = x @ W.T, computed from the packed weight.

    W is dequantized (fp32) a block of rows at a time (at most ``chunk_bytes``),
    never whole; accumulation is fp32 and the result has grad's dtype.
    """
    N, K = qweight.shape[0], in_features
    g2 = grad.reshape(_rows(grad), N)  # (not -1: N may be 0)
    out = torch.zeros((g2.shape[0], K), dtype=torch.float32, device=grad.device)
    step = max(1, chunk_bytes // (4 * K))
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        w = dequantize(qweight[n0:n1], scales[n0:n1], zeros[n0:n1], bits, group_size, K, torch.float32)
        out.addmm_(g2[:, n0:n1].float(), w)
    return out.to(grad.dtype).reshape(*grad.shape[:-1], K)


# --------------------------------------------------------------------------
# Ops without a gradient formula: an input that requires grad must not give a silent zero
# (PyTorch's fallback only warns); backward through them is a clear error instead.
# --------------------------------------------------------------------------
def _no_gradient(name: str, why: str) -> None:
    def backward(ctx, *grads):
        raise RuntimeError(f"quantkern.{name}: {why}")

    torch.library.register_autograd(f"quantkern::{name}", backward, setup_context=lambda ctx, inputs, output: None)


for _sfx in ("", "_triton"):
    _no_gradient(f"fake_quant_lsq_backward{_sfx}", "double backward is not supported (the LSQ+ backward is one fused "
                 "kernel; create_graph=True through fake_quant_lsq has no second-order gradient)")
    _no_gradient(f"dampening_loss_backward{_sfx}", "double backward is not supported (the dampening backward is one "
                 "fused kernel)")
    _no_gradient(f"dequantize{_sfx}", "no gradient with respect to scales / zeros (dequantize is for checks and "
                 "export; to train group scales, write W = (q - zero) * scale in torch ops, as "
                 "quantkern.ptq.conv.distill_qparams_ does)")


def _bump_versions(name: str) -> None:
    """An ADInplaceOrView kernel for the in-place op ``name``: it bumps the version counters of the tensors the
    op writes (its ``Tensor(a!)`` arguments), as torch's own in-place ops do, so that autograd refuses a
    backward through a tensor changed after it was saved (an oscillation_update that rewrote frozen weights
    between a dampening_loss and its backward gave that backward the new values, in silence)."""
    handle = getattr(torch.ops.quantkern, name).default
    args = handle._schema.arguments
    mutated = [(i, a.name) for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]

    def kernel(*a, **kw):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            out = handle(*a, **kw)
        torch.autograd.graph.increment_version([a[i] if i < len(a) else kw[n] for i, n in mutated])
        return out

    LIB.impl(name, kernel, "ADInplaceOrView")


for _sfx in ("", "_triton"):
    _bump_versions(f"oscillation_update{_sfx}")
    _bump_versions(f"calib_histogram{_sfx}")


def op_names() -> list[str]:
    """Names of every quantkern operator, e.g. ``["fake_quant_lsq", ...]``."""
    return sorted(s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("quantkern::"))


def native_op_names() -> list[str]:
    """Operators that quantkern._C must implement on CPU and CUDA (no ``_triton`` suffix)."""
    return [n for n in op_names() if not n.endswith("_triton")]
