"""Triton kernels of the histogram calibrators: ``quantkern::calib_histogram_triton`` and
``quantkern::calib_search_triton`` (semantics: quantkern/reference/calibrate.py; the same
formulas as csrc/shared/calibrate.h).

calib_histogram: one program per (channel, block of M), on a 1-D grid; bins are added with int64
atomics (integer counts: the result does not depend on the order). The bin index is
``trunc(div_rn(|x| * n, R))`` in fp32 (Triton's ``/`` is approximate; ``tl.div_rn`` is IEEE).

calib_search: the per-channel extended bins and their prefix sums (O(C * bins)) are
built with torch ops; one program per (channel, block of candidates) (a 1-D grid) evaluates every
candidate's KL divergence (from prefix sums, O(levels)) or histogram MSE (O(bins)) in
float64; the choice (entropy: last within TIE_TOL of the minimum; mse: first within MSE_RTOL of it)
is a batched torch reduction over the [C, candidates] objectives.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._registry import LIB

_TIE_TOL = 1e-9  # quantkern.reference.calibrate.TIE_TOL
_MSE_RTOL = 1e-10  # quantkern.reference.calibrate.MSE_RTOL
_HBLOCK = 1024
_SBLOCK = 64


@triton.jit
def _hist_kernel(x_ptr, pos_ptr, neg_ptr, r_ptr, n_ptr, bad_ptr, M, B, NMB, BLOCK: tl.constexpr):
    # 1-D grid of C * NMB programs (a grid's y / z sizes stop at 65535: M / BLOCK can be larger)
    pid = tl.program_id(0).to(tl.int64)
    c = pid // NMB
    m = (pid % NMB) * BLOCK + tl.arange(0, BLOCK)
    R = tl.load(r_ptr + c)
    n = tl.load(n_ptr + c)
    mask = (m < M) & (m * 0 + R > 0) & (m * 0 + n > 0)
    v = tl.load(x_ptr + c.to(tl.int64) * M + m, mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(v)
    nf = n.to(tl.float32)
    t = tl.div_rn(a * nf, R)
    # calib_ratio: a finite |x| whose a * n / R overflows fp32 (|x| far beyond R, or R tiny) is not
    # "NaN or infinity": redo the two roundings on a and R scaled by 2^-64 and clamp a quotient
    # still past fp32 to 3e38 (the last bin), as the native kernels do
    slow = ~(t <= 3.0e38) & (a <= 3.4028234664e38)
    ts = tl.div_rn((a * 5.421010862427522e-20) * nf, R * 5.421010862427522e-20)
    t = tl.where(slow, tl.where(ts <= 3.0e38, ts, 3.0e38), t)
    bad = mask & ~(t <= 3.0e38)  # calib_bad: NaN / inf in x only; finite values past R clamp
    tl.atomic_max(bad_ptr, tl.max(bad.to(tl.int32), 0))
    # calib_bin: clamp in float to n - 1 (exact for n <= 2^24), then convert
    top = (n - 1).to(tl.float32)
    idx = tl.where(bad, 0.0, tl.where(t < top, t, top)).to(tl.int64)
    ok = mask & (bad == 0)
    off = c.to(tl.int64) * B + idx
    one = tl.full((BLOCK,), 1, tl.int64)
    tl.atomic_add(neg_ptr + off, one, mask=ok & (v < 0))
    tl.atomic_add(pos_ptr + off, one, mask=ok & (v >= 0))


def calib_histogram_triton(x, pos, neg, R, n):
    from ..ops import _calib_hist_check

    _calib_hist_check("calib_histogram_triton", x, pos, neg, R, n)
    C, M = x.shape
    if C == 0 or M == 0:
        return
    xc = x.contiguous()
    bad = torch.zeros(1, dtype=torch.int32, device=x.device)
    nmb = triton.cdiv(M, _HBLOCK)
    _hist_kernel[(C * nmb,)](xc, pos, neg, R.contiguous(), n.contiguous(), bad, M, pos.shape[1], nmb, BLOCK=_HBLOCK)
    if bool(bad.item()):
        raise ValueError("quantkern.calib_histogram_triton: x contains NaN or infinity")


@triton.jit
def _rint64(v):
    # round half to even: exact for |v| < 2^51, larger doubles are integers already
    r = (v + 6755399441055744.0) - 6755399441055744.0
    return tl.where(tl.abs(v) < 2251799813685248.0, r, v)


@triton.jit
def _xlogx(t):
    return tl.where(t > 0, t * tl.log(tl.where(t > 0, t, 1.0)), 0.0)


@triton.jit
def _search_kernel(ext_ptr, cb_ptr, cz_ptr, cbl_ptr, meta_ptr, fmeta_ptr, obj_ptr, LD, IMAX, UMAX, JMAX, stride,
                   start_bin, nb, hi_q, lo_q, NTB, SYM: tl.constexpr, ENT: tl.constexpr, BLOCK: tl.constexpr):
    # 1-D grid of C * NTB programs (a grid's y / z sizes stop at 65535: IMAX / BLOCK can be larger)
    pid = tl.program_id(0).to(tl.int64)
    c = pid // NTB
    t = (pid % NTB) * BLOCK + tl.arange(0, BLOCK)
    base = c.to(tl.int64) * LD
    pbase = c.to(tl.int64) * (LD + 1)
    zero = tl.load(meta_ptr + c * 6 + 0)
    un = tl.load(meta_ptr + c * 6 + 1)
    up = tl.load(meta_ptr + c * 6 + 2)
    nbx = tl.load(meta_ptr + c * 6 + 3)
    ncand = tl.load(meta_ptr + c * 6 + 4)
    T = tl.load(fmeta_ptr + c * 2 + 0)
    w = tl.load(fmeta_ptr + c * 2 + 1)
    t64 = t.to(tl.int64)
    if SYM:
        l = t64 * 0
        r = start_bin + t64 * stride
        valid = t64 < ncand
    else:
        a = (t64 // nbx) * stride
        b = (t64 % nbx) * stride
        l = zero - a
        r = zero + b
        # a side holding values keeps at least one stride of it (reference: _asym_candidates)
        # (the scalars broadcast to a's shape first: the interpreter rejects a mask mixing them)
        valid = (t64 < ncand) & (a + b >= start_bin) & ((a > 0) | (a * 0 + zero == 0)) & ((b > 0) | (b * 0 + nbx == 1))
    if ENT:
        i = tl.maximum(r - l, 1)
        lc = tl.where(valid, l, 0)
        rc = tl.where(valid, l + i, 1)
        cbl_ = tl.load(cb_ptr + pbase + lc, mask=valid, other=0.0)
        cbr = tl.load(cb_ptr + pbase + rc, mask=valid, other=0.0)
        head = cbr - cbl_
        lt = cbl_
        rt = T - cbr
        f = tl.load(ext_ptr + base + lc, mask=valid, other=0.0)
        g = tl.load(ext_ptr + base + rc - 1, mask=valid, other=0.0)
        per_bin = nb >= i
        U = tl.where(per_bin, i, nb)
        u_last = tl.where(per_bin, i - 1, ((i - 1) * nb) // i)
        plogq = tl.zeros((BLOCK,), tl.float64)
        avg_first = tl.full((BLOCK,), 1.0, tl.float64)
        avg_last = tl.full((BLOCK,), 1.0, tl.float64)
        lo = lc
        for u in range(0, UMAX):
            act = valid & (u < U)
            hi = tl.where(per_bin, lc + u + 1, lc + ((u + 1) * i + nb - 1) // nb)
            hi = tl.where(act, hi, lo)
            S = tl.load(cb_ptr + pbase + hi, mask=act, other=0.0) - tl.load(cb_ptr + pbase + lo, mask=act, other=0.0)
            Z = tl.load(cz_ptr + pbase + hi, mask=act, other=0.0) - tl.load(cz_ptr + pbase + lo, mask=act, other=0.0)
            has = act & (Z > 0)
            avg = tl.where(has, S / tl.where(has, Z, 1.0), 1.0)
            plogq += tl.where(has & (avg > 0), S * tl.log(tl.where(avg > 0, avg, 1.0)), 0.0)
            avg_first = tl.where(has & (u == 0), avg, avg_first)
            avg_last = tl.where(has & (u == u_last), avg, avg_last)
            lo = hi
        plogq += tl.where(lt > 0, lt * tl.log(avg_first), 0.0)
        plogq += tl.where(rt > 0, rt * tl.log(avg_last), 0.0)
        inner = tl.load(cbl_ptr + pbase + tl.maximum(rc - 1, 0), mask=valid, other=0.0) - \
            tl.load(cbl_ptr + pbase + tl.minimum(lc + 1, rc), mask=valid, other=0.0)
        plogp = tl.where(i == 1, _xlogx(f + lt + rt), inner + _xlogx(f + lt) + _xlogx(g + rt))
        d = (plogp - plogq) / T - tl.log(tl.zeros((BLOCK,), tl.float64) + T) + tl.log(tl.where(head > 0, head, 1.0))
        inf = (head <= 0) | ((lt > 0) & (f == 0)) | ((rt > 0) & (g == 0))
        obj = tl.where(inf, float("inf"), d)
    else:
        err = tl.zeros((BLOCK,), tl.float64)
        if SYM:
            amax = (r.to(tl.float64) * w + (r + 1).to(tl.float64) * w) / 2
            s = hi_q / tl.where(valid, amax, 1.0)
            for j in range(0, JMAX):
                cj = (j * 1.0 * w + (j + 1) * 1.0 * w) / 2
                h = tl.load(ext_ptr + base + j, mask=j < up, other=0.0)
                q = tl.minimum(tl.maximum(_rint64(cj * s), lo_q), hi_q)
                e = q / s - cj
                err += e * e * h
        else:
            amin = -((zero - l).to(tl.float64) * w)
            amax = (r - zero).to(tl.float64) * w
            s = (amax - amin) / hi_q
            s = tl.where(valid & (s > 0), s, 1.0)
            z = _rint64(-amin / s)
            for k in range(0, JMAX):
                cen = (k * 1.0 * w + (k + 1) * 1.0 * w) / 2
                hn = tl.load(ext_ptr + base + zero - 1 - k, mask=k < un, other=0.0)
                hp = tl.load(ext_ptr + base + zero + k, mask=k < up, other=0.0)
                qn = tl.minimum(tl.maximum(_rint64(-cen / s) + z, 0.0), hi_q)
                en = (qn - z) * s + cen
                qp = tl.minimum(tl.maximum(_rint64(cen / s) + z, 0.0), hi_q)
                ep = (qp - z) * s - cen
                err += tl.where(k < un, en * en * hn, 0.0)
                err += tl.where(k < up, ep * ep * hp, 0.0)
        obj = err
    tl.store(obj_ptr + c.to(tl.int64) * IMAX + t, tl.where(valid, obj, float("nan")), mask=t < IMAX)


def _extent(h: torch.Tensor) -> torch.Tensor:
    """Index of the last non-zero entry of each row + 1 (0 for an all-zero row)."""
    B = h.shape[1]
    k = torch.arange(1, B + 1, device=h.device)
    return torch.where(h != 0, k, torch.zeros_like(k)).amax(1)


def calib_search_triton(pos, neg, width, n, method, num_bits, unsigned, symmetric, stride, start_bin):
    from ..ops import _calib_search_check

    _calib_search_check("calib_search_triton", pos, neg, width, n, method, num_bits, unsigned, symmetric, stride, start_bin)
    C, B = pos.shape
    dev = pos.device
    ent = method == "entropy"
    amin = torch.zeros(C, dtype=torch.float64, device=dev)
    amax = torch.zeros(C, dtype=torch.float64, device=dev)
    if C == 0:
        return amin, amax
    if int(n.max()) > B or int(n.min()) < 0:
        raise ValueError(f"quantkern.calib_search_triton: n must be in [0, B = pos.shape[1] = {B}]")
    k = torch.arange(B, device=dev)
    inside = k[None, :] < n[:, None]
    p = torch.where(inside, pos, 0).double()
    q = torch.where(inside, neg, 0).double()
    raw = (p + q).sum(1)
    if ent:  # the bin of the exact zeros takes its neighbour's count (reference rule)
        p[:, 0] = torch.where(n > 1, p[:, 1], p[:, 0])
    if symmetric:
        ext = p + q
        if ent:
            ext[:, 0] = torch.where(n > 1, ext[:, 1], ext[:, 0])
        zero = torch.zeros(C, dtype=torch.long, device=dev)
        un, up = zero.clone(), _extent(ext)
        last = n if ent else n - 1
        ncand = torch.where(last >= start_bin, (last - start_bin) // stride + 1, torch.zeros_like(n))
        nbx = torch.ones_like(n)
    else:
        un, up = _extent(q), _extent(p)
        A = (un + stride - 1) // stride * stride
        Bx = (up + stride - 1) // stride * stride
        Lmax = max(int((A + Bx).max()), 1)
        j = torch.arange(Lmax, device=dev)[None, :]
        kn = A[:, None] - 1 - j  # neg bin at j < A
        kp = j - A[:, None]  # pos bin at j >= A
        vn = q.gather(1, kn.clamp(0, B - 1))
        vp = p.gather(1, kp.clamp(0, B - 1))
        ext = torch.where(j < A[:, None], torch.where(kn < B, vn, 0.0), torch.where(kp < B, vp, 0.0))
        zero = A
        nbx = Bx // stride + 1
        ncand = torch.where(A + Bx >= start_bin, (A // stride + 1) * nbx, torch.zeros_like(A))
    ext = ext.contiguous()
    LD = ext.shape[1]
    z1 = torch.zeros(C, 1, dtype=torch.float64, device=dev)
    cb = torch.cat([z1, ext.cumsum(1)], 1).contiguous()
    if ent:
        cz = torch.cat([z1, (ext != 0).double().cumsum(1)], 1).contiguous()
        cbl = torch.cat([z1, torch.where(ext > 0, ext * torch.log(torch.where(ext > 0, ext, 1.0)), 0.0).cumsum(1)], 1).contiguous()
    else:
        cz = cbl = cb
    T = cb[:, -1]
    meta = torch.stack([zero, un, up, nbx, ncand, torch.zeros_like(n)], 1).to(torch.int64).contiguous()
    fmeta = torch.stack([T, width.double()], 1).contiguous()
    IMAX = max(int(ncand.max()), 1)
    nb = 1 << (num_bits - 1 + int(unsigned) if symmetric else num_bits)
    hi_q = float(2 ** (num_bits - 1 + int(unsigned)) - 1) if symmetric else float(2**num_bits - 1)
    lo_q = 0.0 if (unsigned or not symmetric) else -hi_q
    UMAX = min(nb, LD)
    JMAX = max(int(up.max()), int(un.max()), 1)
    obj = torch.empty(C, IMAX, dtype=torch.float64, device=dev)
    ntb = triton.cdiv(IMAX, _SBLOCK)
    _search_kernel[(C * ntb,)](
        ext, cb, cz, cbl, meta, fmeta, obj, LD, IMAX, UMAX, JMAX, stride, start_bin, nb, hi_q, lo_q, ntb,
        SYM=bool(symmetric), ENT=ent, BLOCK=_SBLOCK)
    # the choice, batched over channels (NaN marks invalid slots)
    valid = ~torch.isnan(obj)
    masked = torch.where(valid, obj, torch.full_like(obj, float("inf")))
    slot = torch.arange(IMAX, device=dev)[None, :].expand(C, IMAX)
    has = valid.any(1)
    if ent:
        m = masked.amin(1, keepdim=True)
        t = torch.where(valid & (masked <= m + _TIE_TOL), slot, torch.full_like(slot, -1)).amax(1)
    else:  # the first within _MSE_RTOL (relative) of the minimum
        m = masked.amin(1, keepdim=True)
        t = torch.where(has, (valid & (masked <= m + m * _MSE_RTOL)).to(torch.int8).argmax(1), torch.full_like(n, -1))
    t = torch.where(has, t, torch.full_like(t, -1))
    w = width.double()
    tc = t.clamp(min=0)
    if symmetric:
        r = start_bin + tc * stride
        rf = r.double()
        pick = rf * w if ent else (rf * w + (r + 1).double() * w) / 2
        amax = torch.where(t >= 0, pick, n.double() * w)
        amin = torch.zeros_like(amax) if unsigned else -amax
    else:
        a = (tc // nbx) * stride
        b = (tc % nbx) * stride
        amin = torch.where(t >= 0, -(a.double() * w), -(un.double() * w))
        amax = torch.where(t >= 0, b.double() * w, up.double() * w)
    live = (w > 0) & (raw > 0)  # an empty histogram: (0, 0), as in the reference
    return torch.where(live, amin, torch.zeros_like(amin)), torch.where(live, amax, torch.zeros_like(amax))


_KEYS = ["CUDA"] + (["CPU"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
for _key in _KEYS:
    LIB.impl("calib_histogram_triton", calib_histogram_triton, _key)
    LIB.impl("calib_search_triton", calib_search_triton, _key)
