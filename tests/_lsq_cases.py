"""Inputs shared by the fake_quant_lsq tests (CPU, CUDA, Triton): one builder, so the
three kernels are checked on the same kind of data."""
import torch

from quantkern import reference as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRIDS = {2: (-2, 1), 3: (0, 7), 4: (-8, 7), 8: (-128, 127)}  # bits -> (qmin, qmax), signed and unsigned


def param_shape(shape, axis=None, group_size=None) -> tuple:
    """Shape of scale / offset: [rows, cols // group_size] per group, [shape[axis]] per channel, [1] per tensor."""
    if group_size is not None:
        return (shape[0], shape[1] // group_size)
    if axis is not None:
        return (shape[axis],)
    return (1,)


def lsq_data(shape, axis=None, group_size=None, bits=4, edges=False, ties=False, seed=0):
    """(x, scale, offset, qmin, qmax): fp32 CPU tensors from a seeded generator.

    edges: v = (x - offset) / scale near (not on) the clip edges and the rounding
    boundaries. ties: power-of-two scales and integer offsets, so many v land exactly
    on k + 0.5 (round half to even) and on the clip edges.
    """
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = GRIDS[bits]
    pshape = param_shape(shape, axis, group_size)
    if ties:
        scale = 2.0 ** torch.randint(-3, 1, pshape, generator=g).float()
        offset = torch.randint(-2, 3, pshape, generator=g).float() * scale
        v = torch.randint(2 * qmin - 4, 2 * qmax + 5, shape, generator=g).float() / 2
    else:
        scale = torch.rand(pshape, generator=g) * 0.2 + 0.05
        offset = torch.randn(pshape, generator=g) * 0.05
        v = None
        if edges:
            v = torch.randint(qmin - 1, qmax + 2, shape, generator=g).float()
            v = v + (torch.rand(shape, generator=g) - 0.5) * 0.98
    if v is not None:
        x = v * R.lsq_param_view(v, scale, axis, group_size) + R.lsq_param_view(v, offset, axis, group_size)
    else:
        x = torch.randn(shape, generator=g) * (qmax - qmin) * 0.1
    return x, scale, offset, qmin, qmax


def noncontig(x: torch.Tensor) -> torch.Tensor:
    """The same values with non-contiguous strides (transposed for 2-D, a strided view otherwise)."""
    return x.t().contiguous().t() if x.dim() == 2 else x.unsqueeze(-1).expand(*x.shape, 2)[..., 0]
