"""packed_linear and fake_quant_lsq under torch.func transforms (vmap, grad, vjp, jacrev, hessian, ...).

functorch refuses the native ``packed_linear``'s autograd, a C++ ``torch::autograd::Function``
(csrc/cpu/packed_linear.cpp: no Python on the eager path), and also the autograd that
``torch.library.register_autograd`` gives ``packed_linear_backward`` /
``packed_linear_bias_backward`` (its generated Function has no ``setup_context`` override).
So while a transform is active, :func:`quantkern.ops.packed_linear` goes through the three
Python ``autograd.Function`` s below instead: each runs its op below the autograd key, has the
same derivative as the C++ / registered ones, a forward-mode rule (jvp: all three are linear
in their tensors), and a vmap rule: a batch of x (or dY) is folded into its leading dims, one
kernel call; a batched weight or bias runs one call per sample. Outputs are the same kernels' bits.
``fake_quant_lsq`` (whose ``register_autograd`` autograd is refused the same way) has two more:
reverse mode only, one call per sample under vmap.
"""
import torch


def in_transform() -> bool:
    """Inside a torch.func transform (and not compiling: dynamo refuses the query inside
    ``vmap(torch.compile(f))`` and traces ``vmap`` itself, so compiled code keeps the ops)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _below_autograd(op, *args):
    # the op's own autograd (refused under a transform) is skipped; Function.forward runs with grad
    # off, so it would record nothing anyway. (Never traced: ops.packed_linear keeps compiled code
    # off this path, and dynamo cannot trace the guard.)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def native_kernel(op: str, device: torch.device) -> bool:
    """Whether the native ``quantkern::op`` has a kernel for ``device`` (e.g. a CUDA build)."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkern::{op}", key)


class PackedLinearFn(torch.autograd.Function):
    """y = packed_linear(x, W) + bias; dX = packed_linear_backward(dY, W); dbias = bias_backward(dY)."""

    @staticmethod
    def forward(x, qweight, scales, zeros, bits, group_size, in_features, bias):
        return _below_autograd(torch.ops.quantkern.packed_linear, x, qweight, scales, zeros, bits, group_size,
                               in_features, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, qweight, scales, zeros, bits, group_size, in_features, bias = inputs
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.save_for_forward(qweight, scales, zeros)
        ctx.args = (bits, group_size, in_features)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype, ctx.x_shape = inputs[0].dtype, inputs[0].shape

    @staticmethod
    def backward(ctx, grad):
        qweight, scales, zeros = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = PackedLinearBackwardFn.apply(grad, qweight, scales, zeros, *ctx.args)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[7]:
            gb = BiasBackwardFn.apply(grad).to(ctx.bias_dtype)
        return gx, None, None, None, None, None, None, gb

    @staticmethod
    def vmap(info, in_dims, x, qweight, scales, zeros, bits, group_size, in_features, bias):
        # a batch of x is more leading dims of x: one call; anything else batched, one call per sample
        if in_dims[0] is None or any(d is not None for d in in_dims[1:]):
            return _per_sample(PackedLinearFn, info, in_dims,
                               (x, qweight, scales, zeros, bits, group_size, in_features, bias))
        x = x.movedim(in_dims[0], 0)
        return PackedLinearFn.apply(x, qweight, scales, zeros, bits, group_size, in_features, bias), 0

    @staticmethod
    def jvp(ctx, x_t, qweight_t, scales_t, zeros_t, bits_t, group_size_t, in_features_t, bias_t):
        # linear in x and bias; the packed weight carries no tangent
        qweight, scales, zeros = ctx.saved_tensors
        if x_t is None:
            x_t = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=qweight.device)
        return PackedLinearFn.apply(x_t, qweight, scales, zeros, *ctx.args, bias_t)


class PackedLinearBackwardFn(torch.autograd.Function):
    """dX = packed_linear_backward(dY, W); its derivative along u is packed_linear(u, W)."""

    @staticmethod
    def forward(grad, qweight, scales, zeros, bits, group_size, in_features):
        return _below_autograd(torch.ops.quantkern.packed_linear_backward, grad, qweight, scales, zeros, bits,
                               group_size, in_features)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:4])
        ctx.save_for_forward(*inputs[1:4])
        ctx.args = inputs[4:]

    @staticmethod
    def backward(ctx, g):
        qweight, scales, zeros = ctx.saved_tensors
        gg = PackedLinearFn.apply(g, qweight, scales, zeros, *ctx.args, None) if ctx.needs_input_grad[0] else None
        return gg, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, grad, qweight, scales, zeros, bits, group_size, in_features):
        args = (grad, qweight, scales, zeros, bits, group_size, in_features)
        if in_dims[0] is None or any(d is not None for d in in_dims[1:]):
            return _per_sample(PackedLinearBackwardFn, info, in_dims, args)
        return PackedLinearBackwardFn.apply(grad.movedim(in_dims[0], 0), *args[1:]), 0

    @staticmethod
    def jvp(ctx, grad_t, *_):
        qweight, scales, zeros = ctx.saved_tensors
        return PackedLinearBackwardFn.apply(grad_t, qweight, scales, zeros, *ctx.args)


class BiasBackwardFn(torch.autograd.Function):
    """packed_linear_bias_backward(dY): dY summed over its leading dims in fp32; derivative: expand."""

    @staticmethod
    def forward(grad):
        return _below_autograd(torch.ops.quantkern.packed_linear_bias_backward, grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape, ctx.dtype = inputs[0].shape, inputs[0].dtype

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).expand(ctx.shape) if ctx.needs_input_grad[0] else None

    @staticmethod
    def vmap(info, in_dims, grad):
        # the op sums over every leading dim, the batch's too: one call per sample
        return _per_sample(BiasBackwardFn, info, in_dims, (grad,))

    @staticmethod
    def jvp(ctx, grad_t):
        return BiasBackwardFn.apply(grad_t)


def _per_sample(fn, info, in_dims, args):
    """vmap rule of last resort: ``fn`` on each sample, stacked on dim 0 (the ops' own bits); a
    tuple output is stacked element by element."""
    outs = [fn.apply(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


class FakeQuantLSQFn(torch.autograd.Function):
    """fake_quant_lsq under torch.func transforms: same kernels and derivative as the registered
    autograd (quantkern/_registry.py); vmap runs one call per sample; no jvp (torch says so)."""

    @staticmethod
    def forward(x, scale, offset, qmin, qmax, axis, group_size, grad_scale, be):
        fn = torch.ops.quantkern.fake_quant_lsq_triton if be == "triton" else torch.ops.quantkern.fake_quant_lsq
        return _below_autograd(fn, x, scale, offset, qmin, qmax, axis, group_size, grad_scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, offset, qmin, qmax, axis, group_size, grad_scale, be = inputs
        ctx.save_for_backward(x, scale, offset)
        ctx.args = (qmin, qmax, axis, group_size, grad_scale)
        ctx.be = be

    @staticmethod
    def backward(ctx, grad):
        x, scale, offset = ctx.saved_tensors
        gx, gs, gb = FakeQuantLSQBackwardFn.apply(grad.contiguous(), x, scale, offset, *ctx.args, ctx.be)
        return gx, gs, gb, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return _per_sample(FakeQuantLSQFn, info, in_dims, args)


class FakeQuantLSQBackwardFn(torch.autograd.Function):
    """fake_quant_lsq_backward under torch.func transforms (the registered op's autograd, which
    raises for double backward, is refused there too); a second derivative raises the same error."""

    @staticmethod
    def forward(grad, x, scale, offset, qmin, qmax, axis, group_size, grad_scale, be):
        bwd = (torch.ops.quantkern.fake_quant_lsq_backward_triton if be == "triton"
               else torch.ops.quantkern.fake_quant_lsq_backward)
        return _below_autograd(bwd, grad, x, scale, offset, qmin, qmax, axis, group_size, grad_scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "quantkern.fake_quant_lsq: double backward is not supported (the LSQ+ backward is one fused "
            "kernel; a second-order gradient through fake_quant_lsq has no rule)"
        )

    @staticmethod
    def vmap(info, in_dims, *args):
        return _per_sample(FakeQuantLSQBackwardFn, info, in_dims, args)
