"""Triton kernel: quantkern::hqq_quantize_triton (the HQQ zero-point solver).

The math is csrc/shared/hqq.h transcribed (one lane = one group, the same fp32
operation order, the same polynomial power), so on every input it returns what
the CPU kernels and quantkern/reference/hqq.py (order="kernel") return, bit for
bit, except that it always evaluates the shrink (the CPU skips it where it is
provably 0: same values). Registered for CUDA, and for CPU when
``TRITON_INTERPRET=1`` (the interpreter is how the tests run it here).

A program owns BLOCK groups; each group's g values are re-read from L1/L2 on
every iteration (Triton cannot index a register tile by a loop counter), which
keeps the sums sequential. Global early stop: the solve kernel writes every
zero update and per-program fp64 error sums; the stop is decided on the device
with torch ops (no host sync) and a second kernel writes q.

Numerics: round-half-to-even is ``(x + 1.5 * 2^23) - 1.5 * 2^23`` (exact for
|x| < 2^22; larger values are clamped to [0, qmax] right after, which the
approximation preserves); division is ``tl.div_rn``; kernels launch with
``enable_fp_fusion=False`` (no FMA contraction).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .._registry import LIB

_BLOCK = 128
_MODES = {"global": 0, "group": 1, "none": 2}


@triton.jit
def _rint(x):
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _quant(w, s, z, qmax):
    return tl.minimum(tl.maximum(_rint(w * s + z), 0.0), qmax)


@triton.jit
def _pow(a, y):
    b = a.to(tl.int32, bitcast=True)
    m = ((b & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    e = ((b >> 23) - 127).to(tl.float32)
    big = m > 1.41421353816986083984375
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1.0, e)
    t = tl.div_rn(m - 1.0, m + 1.0)
    t2 = t * t
    p = t2 * 0.111111111938953399658203125 + 0.142857149243354797363281250
    p = p * t2 + 0.200000002980232238769531250
    p = p * t2 + 0.333333343267440795898437500
    p = p * t2 + 1.0
    lnm = (t * p) * 2.0
    lg = lnm * 1.44269502162933349609375
    cy = y * 4097.0
    yh = cy - (cy - y)
    yl = y - yh
    big = yh * e
    small = yl * e + y * lg
    n = tl.minimum(tl.maximum(_rint(big + small), -126.0), 126.0)
    u = ((big - n) + small) * 0.693147182464599609375
    r = u * 0.000198412701138295233249664306640625 + 0.001388888922519981861114501953125
    r = r * u + 0.008333333767950534820556640625
    r = r * u + 0.041666667908430099487304687500
    r = r * u + 0.166666671633720397949218750
    r = r * u + 0.5
    r = r * u + 1.0
    r = r * u + 1.0
    two_n = ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return r * two_n


@triton.jit
def _elem(w, s, z, qmax, c, y, thr, L1: tl.constexpr):
    """(q - (w - we) * s, |w - wr|) for one element of every lane's group."""
    q = _quant(w, s, z, qmax)
    d = w - tl.div_rn(q - z, s)
    a = tl.abs(d)
    small = a < thr
    if L1:
        pw = tl.full(a.shape, 1.0, tl.float32)
    else:
        pw = _pow(tl.where(small, 1.0, a), y)
    r = a - c * pw
    r = tl.where(r > 0.0, r, 0.0)
    r = tl.where(small, 0.0, r)
    we = tl.where(d < 0.0, 0.0 - r, r)
    return q - (w - we) * s, a


@triton.jit
def _hqq_solve_kernel(w_ptr, sinv_ptr, scale_ptr, zero_ptr, zhist_ptr, errp_ptr, q_ptr, bad_ptr, c_ptr, thr_ptr,
                      M, G, qmax, wmax, y, ITERS,
                      AXIS: tl.constexpr, MODE: tl.constexpr, L1: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = j < M
    jj = tl.where(valid, j, 0)  # padded lanes compute group 0 and store nothing
    M64 = tl.full((), M, tl.int64)  # 64-bit index arithmetic throughout
    if AXIS == 1:
        base = jj * G
        step = tl.full((), 1, tl.int64)
    else:
        base = jj
        step = M64
    gf = tl.full(j.shape, G, tl.float32)

    w = tl.load(w_ptr + base).to(tl.float32)
    mn = w
    mx = w
    chk = w - w
    for i in range(1, G):
        w = tl.load(w_ptr + base + i * step).to(tl.float32)
        mn = tl.minimum(mn, w)
        mx = tl.maximum(mx, w)
        chk = chk + (w - w)
    den = mx - mn
    s = tl.div_rn(tl.full(den.shape, 1.0, tl.float32), den) * qmax
    s = tl.where(den <= 1e-4, 1.0, s)
    s = tl.minimum(s, 20000.0)
    z = (mn * -1.0) * s
    # NaN / inf in the group, or max|w| > wmax (csrc/shared/hqq.h: the fp32 intermediates would overflow)
    tl.store(bad_ptr + pid, tl.sum(tl.where(valid & ((chk != chk) | (tl.maximum(mx, -mn) > wmax)), 1, 0)))
    tl.store(sinv_ptr + j, s, mask=valid)
    tl.store(scale_ptr + j, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s), mask=valid)
    if MODE == 0:
        tl.store(zhist_ptr + j, z, mask=valid)

    best = tl.full(s.shape, float("inf"), tl.float32)
    zbest = z
    active = valid | (~valid)  # all lanes
    for it in range(ITERS):
        c = tl.load(c_ptr + it)
        thr = tl.load(thr_ptr + it)
        z0 = tl.zeros(s.shape, tl.float32)
        z1 = tl.zeros(s.shape, tl.float32)
        e0 = tl.zeros(s.shape, tl.float32)
        e1 = tl.zeros(s.shape, tl.float32)
        for i in range(0, G - 1, 2):
            wa = tl.load(w_ptr + base + i * step).to(tl.float32)
            wb = tl.load(w_ptr + base + (i + 1) * step).to(tl.float32)
            ta, aa = _elem(wa, s, z, qmax, c, y, thr, L1)
            tb, ab = _elem(wb, s, z, qmax, c, y, thr, L1)
            z0 = z0 + ta
            e0 = e0 + aa
            z1 = z1 + tb
            e1 = e1 + ab
        if G % 2 == 1:
            wa = tl.load(w_ptr + base + (G - 1) * step).to(tl.float32)
            ta, aa = _elem(wa, s, z, qmax, c, y, thr, L1)
            z0 = z0 + ta
            e0 = e0 + aa
        zn = tl.div_rn(z0 + z1, gf)
        esum = e0 + e1
        if MODE == 0:
            tl.store(errp_ptr + pid.to(tl.int64) * ITERS + it, tl.sum(tl.where(valid, esum, 0.0).to(tl.float64)))
            z = zn
            tl.store(zhist_ptr + (it + 1) * M64 + j, z, mask=valid)
        elif MODE == 1:
            e = tl.div_rn(esum, gf)
            imp = active & (e < best)
            active = imp
            best = tl.where(imp, e, best)
            zbest = tl.where(imp, z, zbest)
            z = tl.where(imp, zn, z)
        else:
            z = zn
    if MODE != 0:
        if MODE == 1:
            z = tl.where(active, z, zbest)
        tl.store(zero_ptr + j, z, mask=valid)
        for i in range(0, G):
            w = tl.load(w_ptr + base + i * step).to(tl.float32)
            tl.store(q_ptr + base + i * step, _quant(w, s, z, qmax).to(tl.uint8), mask=valid)


@triton.jit
def _hqq_q_kernel(w_ptr, sinv_ptr, zero_ptr, q_ptr, M, G, qmax, AXIS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = j < M
    if AXIS == 1:
        base = j * G
        step = tl.full((), 1, tl.int64)
    else:
        base = j
        step = tl.full((), M, tl.int64)
    s = tl.load(sinv_ptr + j, mask=valid, other=1.0)
    z = tl.load(zero_ptr + j, mask=valid, other=0.0)
    for i in range(0, G):
        w = tl.load(w_ptr + base + i * step, mask=valid, other=0.0).to(tl.float32)
        tl.store(q_ptr + base + i * step, _quant(w, s, z, qmax).to(tl.uint8), mask=valid)


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def hqq_constants(lp_norm: float, beta: float, kappa: float, iters: int) -> tuple[list[float], list[float]]:
    """Per-iteration c_i = fp32(1 / beta_i) and shrink thresholds, as csrc/cpu/hqq_host.h computes them."""
    cs, thrs, b = [], [], float(beta)
    for i in range(iters):
        c = _f32(1.0 / b) if b else math.inf  # beta annealed to 0: c = inf, as in C++
        if not (math.isfinite(b) and c >= 1.1754943508222875e-38):
            raise ValueError(
                f"quantkern.hqq_quantize: beta * kappa^i leaves the fp32 range at iteration {i} (beta_i = {b}); "
                "use a smaller kappa or fewer iters"
            )
        t = c ** (1.0 / (2.0 - lp_norm)) * (1.0 - 1e-4)
        cs.append(c)
        thrs.append(_f32(max(t, 1.1754943508222875e-38)))
        b *= kappa
    return cs, thrs


def hqq_quantize_triton(W, bits, group_size, axis=1, lp_norm=0.7, beta=10.0, kappa=1.01, iters=20, early_stop="global"):
    from ..ops import _hqq_check_args

    _hqq_check_args("hqq_quantize_triton", W, bits, group_size, axis, lp_norm, beta, kappa, iters, early_stop)
    N, K = W.shape
    g = group_size
    M = N * K // g
    mode = _MODES[early_stop] if iters > 0 else 2
    dev = W.device
    Wc = W.contiguous()
    q = torch.empty((N, K), dtype=torch.uint8, device=dev)
    scale = torch.empty((N, K // g), dtype=torch.float32, device=dev)
    zero = torch.empty((N, K // g), dtype=torch.float32, device=dev)
    if M == 0:
        return q, scale, zero
    cs, thrs = hqq_constants(lp_norm, beta, kappa, iters)
    c_t = torch.tensor(cs + [0.0], dtype=torch.float32, device=dev)
    thr_t = torch.tensor(thrs + [0.0], dtype=torch.float32, device=dev)
    nprog = triton.cdiv(M, _BLOCK)
    s_inv = torch.empty(M, dtype=torch.float32, device=dev)
    bad = torch.zeros(nprog, dtype=torch.int32, device=dev)
    if mode == 0:
        zhist = torch.empty((iters + 1, M), dtype=torch.float32, device=dev)
        errp = torch.empty((nprog, iters), dtype=torch.float64, device=dev)
    else:
        zhist = errp = s_inv  # unused
    _hqq_solve_kernel[(nprog,)](
        Wc, s_inv, scale, zero, zhist, errp, q, bad, c_t, thr_t,
        M, g, float(2**bits - 1), _f32(2.0**127 / max(g, 2)), _f32(lp_norm - 1.0), iters,
        AXIS=axis, MODE=mode, L1=lp_norm == 1.0, BLOCK=_BLOCK, enable_fp_fusion=False,
    )
    if bool(bad.any()):
        raise ValueError("quantkern.hqq_quantize_triton: W contains NaN or infinity, or a group with max|W| * "
                         "max(group_size, 2) > 2^127 (the fp32 solver would overflow: scale W down by a power of two)")
    if mode == 0:
        # The official rule on the device: E_i = fp32(sum of error sums / numel); the loop
        # breaks after applying the update of the first i with !(E_i < E_{i-1}) (E_-1 = inf).
        E = (errp.sum(0) / float(N * K)).float()
        prev = torch.cat([torch.full((1,), math.inf, dtype=torch.float32, device=dev), E[:-1]])
        stop = ~(E < prev)
        first = torch.where(stop.any(), stop.to(torch.int32).argmax(), torch.tensor(iters - 1, device=dev))
        zero.view(-1).copy_(zhist.index_select(0, (first + 1).view(1).to(torch.int64)).view(-1))
        _hqq_q_kernel[(nprog,)](Wc, s_inv, zero, q, M, g, float(2**bits - 1), AXIS=axis, BLOCK=_BLOCK,
                                enable_fp_fusion=False)
    return q, scale, zero


_KEYS = ["CUDA"] + (["CPU"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
for _key in _KEYS:
    LIB.impl("hqq_quantize_triton", hqq_quantize_triton, _key)
