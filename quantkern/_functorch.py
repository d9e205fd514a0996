"""packed_linear, fake_quant_lsq, dampening_loss and dequantize under torch.func transforms (vmap, grad, vjp, jacrev, hessian, ...).

functorch refuses the native ``packed_linear``'s autograd, a C++ ``torch::autograd::Function``
(csrc/cpu/packed_linear.cpp: no Python on the eager path), and also the autograd that
``torch.library.register_autograd`` gives ``packed_linear_backward`` /
``packed_linear_bias_backward`` (its generated Function has no ``setup_context`` override).
So while a transform is active, :func:`quantkern.ops.packed_linear` goes through the three
Python ``autograd.Function`` s below instead: each runs its op below the autograd key, has the
same derivative as the C++ / registered ones, a forward-mode rule (jvp: all three are linear
in their tensors), and a vmap rule: a batch of x (or dY) is folded into its leading dims, one
kernel call; a batched weight or bias runs one call per sample. Outputs are the same kernels'
(a folded batch is one call with more rows: as accurate, not always the per-sample loop's bits).
``fake_quant_lsq`` (whose ``register_autograd`` autograd is refused the same way) has two more,
and ``dampening_loss`` two: reverse mode only, one call per sample under vmap.

Under ``torch.compile`` dynamo traces the transforms itself (their interpreters are live while it
traces). Inside ``vmap`` (or ``functionalize``) alone the raw op is traced (through the vmap rule
``quantkern/_registry.py`` registers for it: a batch of x folded, as here). Inside ``grad`` / ``vjp``
/ ``jacrev`` / ``jvp`` / ``hessian`` (alone or under vmap) the op has no compiled form: dynamo refuses an ``autograd.Function`` with a jvp rule, traces one without it
only when an input requires grad outside the transforms (it does not see the transform's own
tracking, so it ran the raw op: "cannot use C++ torch::autograd::Function with functorch
transforms"), and its compiled Function has no vmap rule. So the call breaks the graph
(``torch.compiler.disable``): without ``fullgraph`` the frame runs eagerly, where the Functions
below work; with ``fullgraph=True`` dynamo's error carries the reason and the way out.

The packed weight is frozen: scales / zeros that require grad, carry a tangent or are
differentiated by a transform raise (:data:`METADATA_GRAD_ERROR`) rather than get a silent zero.
"""
import torch

METADATA_GRAD_ERROR = (
    "no gradient with respect to scales / zeros (the packed weight is frozen: they would silently get "
    "none, or a zero under torch.func); pass them detached (.detach()) or call under torch.no_grad(). To train "
    "group scales, write W = (q - zero) * scale in torch ops, as quantkern.ptq.conv.distill_qparams_ does")


def metadata_grad_error(op: str = "packed_linear") -> RuntimeError:
    return RuntimeError(f"quantkern.{op}: {METADATA_GRAD_ERROR}")


@torch.compiler.assume_constant_result
def _active_transforms() -> tuple:
    """Names of the active functorch transforms ("Vmap", "Grad", "Jvp", "Functionalize"). A constant of
    the traced code: dynamo runs it while tracing, when the interpreters the code itself pushes are live
    (and it guards the stack the frame was entered with)."""
    return tuple(ci.key().name for ci in (torch._C._functorch.get_interpreter_stack() or ()))


EAGER, COMPILED = "eager", "compiled"


def transform_kind():
    """How ``packed_linear`` / ``fake_quant_lsq`` must run here: None (no transform, or dynamo tracing
    inside ``vmap`` / ``functionalize`` only: the raw op), EAGER (inside an eager transform: the Python
    Functions) or COMPILED (dynamo tracing inside a grad / jvp transform: no compiled form, the graph
    breaks: :func:`apply`). Outside a transform it costs two C calls."""
    if torch.compiler.is_compiling():
        if torch._C._are_functorch_transforms_active() and not set(_active_transforms()) <= {"Vmap", "Functionalize"}:
            return COMPILED
        return None
    if not torch._C._are_functorch_transforms_active():
        return None
    # functionalize alone runs the raw ops (the Functions have no functionalize rule)
    return None if set(_active_transforms()) <= {"Functionalize"} else EAGER


def refuse_dual(op: str, *tensors) -> None:
    """Raises if a forward-mode AD tangent (``torch.autograd.forward_ad`` dual tensors) reaches ``op``,
    whose autograd (``torch.library.register_autograd``) has no jvp: torch would drop the tangent in
    silence. (``torch.func.jvp`` goes through the Functions below, which refuse it themselves.)"""
    fwd = torch.autograd.forward_ad
    if fwd._current_level >= 0 and any(t is not None and fwd.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            f"quantkern.{op}: forward-mode AD (dual tensors, jvp) is not supported: its derivative is defined "
            "for reverse mode only (backward, torch.func.grad / vjp)")


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
        # None, not zeros, for the tangent of an input that has none: a tangent of scales / zeros is refused
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.save_for_forward(qweight, scales, zeros)
        ctx.args = (bits, group_size, in_features)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype, ctx.x_shape = inputs[0].dtype, inputs[0].shape

    @staticmethod
    def backward(ctx, grad):
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:  # else a silent zero gradient
            raise metadata_grad_error()
        qweight, scales, zeros = ctx.saved_tensors
        gx = gb = None
        if grad is None:  # (grads are not materialised)
            return (None,) * 8
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
        # linear in x and bias; the packed weight carries no tangent (a tangent of scales / zeros
        # would be dropped: refused)
        if scales_t is not None or zeros_t is not None:
            raise metadata_grad_error()
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
        ctx.set_materialize_grads(False)  # (as in PackedLinearFn)
        ctx.save_for_backward(*inputs[1:4])
        ctx.save_for_forward(*inputs[1:4])
        ctx.args = inputs[4:]

    @staticmethod
    def backward(ctx, g):
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise metadata_grad_error()
        qweight, scales, zeros = ctx.saved_tensors
        gg = (PackedLinearFn.apply(g, qweight, scales, zeros, *ctx.args, None)
              if ctx.needs_input_grad[0] and g is not None else None)
        return gg, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, grad, qweight, scales, zeros, bits, group_size, in_features):
        args = (grad, qweight, scales, zeros, bits, group_size, in_features)
        if in_dims[0] is None or any(d is not None for d in in_dims[1:]):
            return _per_sample(PackedLinearBackwardFn, info, in_dims, args)
        return PackedLinearBackwardFn.apply(grad.movedim(in_dims[0], 0), *args[1:]), 0

    @staticmethod
    def jvp(ctx, grad_t, qweight_t, scales_t, zeros_t, *_):
        if scales_t is not None or zeros_t is not None:
            raise metadata_grad_error()
        qweight, scales, zeros = ctx.saved_tensors
        return PackedLinearBackwardFn.apply(grad_t, qweight, scales, zeros, *ctx.args)  # (grad_t: the only other)


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
    tuple output is stacked element by element. An empty batch gives empty outputs of the right shape."""
    if info.batch_size == 0:
        return _empty_batch(fn, in_dims, args)
    outs = [fn.apply(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


def _empty_batch(fn, in_dims, args):
    """``_per_sample`` of a batch of 0: the per-sample output shapes from one call on meta tensors
    (the ops' fake kernels: no data, no kernel), each with a leading 0."""
    dev = next(a.device for a in args if isinstance(a, torch.Tensor))
    meta = [a.new_empty(a.shape[:d] + a.shape[d + 1:], device="meta") if d is not None
            else a.to("meta") if isinstance(a, torch.Tensor) else a for a, d in zip(args, in_dims)]
    out = fn.apply(*meta)
    if isinstance(out, tuple):
        return (tuple(torch.empty((0, *o.shape), dtype=o.dtype, device=dev) for o in out), (0,) * len(out))
    return torch.empty((0, *out.shape), dtype=out.dtype, device=dev), 0


@torch.compiler.disable(reason=(
    "quantkern's packed_linear / fake_quant_lsq cannot be compiled inside torch.func.grad / vjp / jacrev / jvp / "
    "jacfwd / hessian (PyTorch compiles no autograd.Function under them: dynamo does not see the transform's grad "
    "tracking and has no jvp / vmap rule for it), so the graph breaks here and the frame runs eagerly, transforms "
    "included. With fullgraph=True: drop fullgraph=True (the frame then runs eagerly, as said), or run the "
    "torch.func transform without torch.compile (e.g. torch.func.vmap(torch.func.grad(f))(x) eagerly); "
    "torch.compile of torch.func.vmap alone traces"))
def _eager_apply(fn, *args):
    return fn.apply(*args)


def apply(kind, fn, *args):
    """``fn.apply(*args)`` inside a transform (``kind`` from :func:`transform_kind`): directly when
    eager, behind a graph break when dynamo traces a grad / jvp transform."""
    return fn.apply(*args) if kind == EAGER else _eager_apply(fn, *args)


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


def _backward_op_fn(op: str, why: str):
    """An autograd.Function for ``quantkern::<op>`` (or its ``_triton`` twin: the last argument, the
    backend, picks) under torch.func transforms, where the op's registered autograd (which raises for
    double backward) is refused too; a second derivative raises the same error, naming ``why``."""
    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            *args, be = args
            return _below_autograd(getattr(torch.ops.quantkern, op + ("_triton" if be == "triton" else "")), *args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, *grads):
            raise RuntimeError(f"quantkern.{op.removesuffix('_backward')}: double backward is not supported ({why})")

        @staticmethod
        def vmap(info, in_dims, *args):
            return _per_sample(Fn, info, in_dims, args)

    Fn.__name__ = Fn.__qualname__ = "".join(w.title() for w in op.split("_")).replace("Lsq", "LSQ") + "Fn"
    return Fn


FakeQuantLSQBackwardFn = _backward_op_fn(
    "fake_quant_lsq_backward", "the LSQ+ backward is one fused kernel; a second-order gradient through "
    "fake_quant_lsq has no rule")


class DequantizeFn(torch.autograd.Function):
    """dequantize under torch.func transforms: the same kernel; scales / zeros that the transform
    differentiates (grad, vjp, jvp, jacfwd) raise :data:`METADATA_GRAD_ERROR` (its registered autograd is
    refused here with torch's generic error, and a jvp tangent was dropped: a zero Jacobian); one call per
    sample under vmap."""

    @staticmethod
    def forward(qweight, scales, zeros, bits, group_size, in_features, dtype, be):
        fn = torch.ops.quantkern.dequantize_triton if be == "triton" else torch.ops.quantkern.dequantize
        return _below_autograd(fn, qweight, scales, zeros, bits, group_size, in_features, dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise metadata_grad_error("dequantize")

    @staticmethod
    def jvp(ctx, *tangents):
        raise metadata_grad_error("dequantize")

    @staticmethod
    def vmap(info, in_dims, *args):
        return _per_sample(DequantizeFn, info, in_dims, args)


class DampeningLossFn(torch.autograd.Function):
    """dampening_loss under torch.func transforms: the registered op's derivative (in the weight only,
    dampening_loss_backward), one call per sample under vmap, no jvp (torch says so)."""

    @staticmethod
    def forward(weight, scale, offset, qmin, qmax, axis, group_size, norm, be):
        fn = torch.ops.quantkern.dampening_loss_triton if be == "triton" else torch.ops.quantkern.dampening_loss
        return _below_autograd(fn, weight, scale, offset, qmin, qmax, axis, group_size, norm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])
        ctx.args, ctx.be = inputs[3:8], inputs[8]

    @staticmethod
    def backward(ctx, grad):
        weight, scale, offset = ctx.saved_tensors
        gw = DampeningLossBackwardFn.apply(grad, weight, scale, offset, *ctx.args, ctx.be) \
            if ctx.needs_input_grad[0] else None
        return gw, None, None, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return _per_sample(DampeningLossFn, info, in_dims, args)


DampeningLossBackwardFn = _backward_op_fn("dampening_loss_backward", "the dampening backward is one fused kernel")
