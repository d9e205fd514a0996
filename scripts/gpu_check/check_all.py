"""CUDA native vs CPU native, every op, ragged shapes (needs a GPU; run by scripts/gpu_check/run.sh).

SMALL=1: a few cases (for compute-sanitizer). Exits non-zero on any mismatch.
"""
import math
import os
import sys
import traceback

import torch

import quantkern  # noqa: F401
from quantkern import _load  # noqa: F401

Q = torch.ops.quantkern
SMALL = os.environ.get("SMALL") == "1"
DT = [torch.float32, torch.float16, torch.bfloat16]
fails = []


def check(name, cond, msg=""):
    if not cond:
        fails.append(f"{name}: {msg}")
        print("FAIL", name, msg, flush=True)


def run(name, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        fails.append(f"{name}: EXC {type(e).__name__}: {str(e)[:300]}")
        print("EXC", name, type(e).__name__, str(e)[:300], flush=True)
        traceback.print_exc(limit=2)


def eq(a, b):
    a, b = a.cpu(), b.cpu()
    if a.dtype.is_floating_point:
        return torch.equal(a.float().nan_to_num(7e7), b.float().nan_to_num(7e7))
    return torch.equal(a, b)


def maxrel(a, b):
    a, b = a.cpu().double(), b.cpu().double()
    return float(((a - b).abs() / (b.abs() + 1e-3)).max()) if a.numel() else 0.0


g = torch.Generator().manual_seed(0)


# ---------------------------------------------------------------- LSQ
def lsq_case(shape, axis, gs, dt, bits=4):
    x = (torch.randn(shape, generator=g) * 2).to(dt)
    if gs is not None:
        ps = (shape[0], shape[1] // gs)
    elif axis is not None:
        ps = (shape[axis],)
    else:
        ps = (1,)
    s = torch.rand(ps, generator=g) * 0.3 + 0.05
    b = torch.randn(ps, generator=g) * 0.1
    n, p = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    gr = torch.randn(shape, generator=g).to(dt)
    yc = Q.fake_quant_lsq(x, s, b, n, p, axis, gs, 0.1)
    yg = Q.fake_quant_lsq(x.cuda(), s.cuda(), b.cuda(), n, p, axis, gs, 0.1)
    nm = f"lsq{shape}-{axis}-{gs}-{dt}"
    check(nm + " fwd", eq(yc, yg))
    c = Q.fake_quant_lsq_backward(gr, x, s, b, n, p, axis, gs, 0.1)
    d = Q.fake_quant_lsq_backward(gr.cuda(), x.cuda(), s.cuda(), b.cuda(), n, p, axis, gs, 0.1)
    check(nm + " gx", eq(c[0], d[0]))
    check(nm + " gs", torch.allclose(c[1], d[1].cpu(), rtol=1e-3, atol=1e-3), f"{(c[1]-d[1].cpu()).abs().max()}")
    check(nm + " gb", torch.allclose(c[2], d[2].cpu(), rtol=1e-3, atol=1e-3), f"{(c[2]-d[2].cpu()).abs().max()}")


lsq_cases = [((37,), None, None), ((5, 4097), None, None), ((7, 33), 0, None), ((9, 5, 3), 1, None),
             ((300, 7), 1, None), ((3, 64), None, 16), ((4, 96), None, 32), ((2, 3, 40), 2, None),
             ((70000, 3), 1, None), ((3, 9000), 0, None), ((1, 1), 0, None), ((130, 5, 33), 1, None)]
if SMALL:
    lsq_cases = lsq_cases[:6]
for sh, ax, gsz in lsq_cases:
    for dt in DT:
        run(f"lsq {sh}", lambda: lsq_case(sh, ax, gsz, dt))


# ---------------------------------------------------------------- oscillation
def osc_case(shape, axis, gs, dt, thr):
    w0 = (torch.randn(shape, generator=g)).to(dt)
    ps = (shape[0], shape[1] // gs) if gs else ((shape[axis],) if axis is not None else (1,))
    s = torch.rand(ps, generator=g) * 0.2 + 0.05
    b = torch.randn(ps, generator=g) * 0.05
    meta0 = torch.zeros(shape, dtype=torch.int32)
    ema0 = torch.zeros(shape)
    wc, mc, ec = w0.clone(), meta0.clone(), ema0.clone()
    wg, mg, eg = w0.cuda(), meta0.cuda(), ema0.cuda()
    nm = f"osc{shape}-{axis}-{gs}-{dt}-{thr}"
    for step in range(6):
        noise = (torch.randn(shape, generator=g) * 0.05).to(dt)
        wc.add_(noise)
        wg.add_(noise.cuda())
        cc = Q.oscillation_update(wc, s, b, mc, ec, -4, 3, axis, gs, 0.3, thr)
        cg = Q.oscillation_update(wg, s.cuda(), b.cuda(), mg, eg, -4, 3, axis, gs, 0.3, thr)
        check(nm + f" counts{step}", eq(cc, cg), f"{cc} {cg}")
        check(nm + f" meta{step}", eq(mc, mg))
        check(nm + f" ema{step}", eq(ec, eg))
        check(nm + f" w{step}", eq(wc, wg))
    lc = Q.dampening_loss(wc, s, b, -4, 3, axis, gs, 0.5)
    lg = Q.dampening_loss(wg, s.cuda(), b.cuda(), -4, 3, axis, gs, 0.5)
    check(nm + " damp", torch.allclose(lc, lg.cpu(), rtol=1e-4), f"{lc} {lg}")
    gr = torch.tensor(1.5)
    bc = Q.dampening_loss_backward(gr, wc, s, b, -4, 3, axis, gs, 0.5)
    bg = Q.dampening_loss_backward(gr.cuda(), wg, s.cuda(), b.cuda(), -4, 3, axis, gs, 0.5)
    check(nm + " dampbwd", eq(bc, bg))


osc_cases = [((33, 7), 0, None), ((5, 3, 3, 3), 0, None), ((4, 64), None, 32), ((1000,), None, None),
             ((70, 130), 1, None)]
if SMALL:
    osc_cases = osc_cases[:3]
for sh, ax, gsz in osc_cases:
    for dt in DT:
        for thr in (0.0, 0.2):
            run(f"osc {sh}", lambda: osc_case(sh, ax, gsz, dt, thr))


# ---------------------------------------------------------------- hqq
def hqq_case(N, K, gsz, axis, mode, dt, bits=4):
    W = (torch.randn(N, K, generator=g) * 0.02).to(dt)
    c = Q.hqq_quantize(W, bits, gsz, axis, 0.7, 10.0, 1.01, 20, mode)
    d = Q.hqq_quantize(W.cuda(), bits, gsz, axis, 0.7, 10.0, 1.01, 20, mode)
    nm = f"hqq{N}x{K}-g{gsz}-ax{axis}-{mode}-{dt}"
    for i, t in enumerate(("q", "scale", "zero")):
        check(nm + " " + t, eq(c[i], d[i]), f"mism {(c[i].float() != d[i].cpu().float()).sum()}")


hqq_cases = [(7, 64, 64, 1), (5, 96, 32, 0), (3, 21, 7, 1), (33, 800, 400, 1), (9, 1200, 400, 0), (130, 256, 128, 1),
             (16, 64, 16, 0)]
if SMALL:
    hqq_cases = hqq_cases[:4]
for N, K, gsz, ax in hqq_cases:
    for mode in ("global", "group", "none"):
        for dt in (DT if not SMALL else DT[:1]):
            run("hqq", lambda: hqq_case(N, K, gsz, ax, mode, dt))


# ---------------------------------------------------------------- calib
def calib_case(C, M, B, dt):
    x = (torch.randn(C, M, generator=g) * 3).to(dt)
    R = x.float().abs().amax(1).clamp_min(1e-3) * 1.1
    n = torch.full((C,), B, dtype=torch.int64)
    pc = torch.zeros(C, B, dtype=torch.int64)
    nc = torch.zeros(C, B, dtype=torch.int64)
    pg, ng = pc.cuda(), nc.cuda()
    Q.calib_histogram(x, pc, nc, R, n)
    Q.calib_histogram(x.cuda(), pg, ng, R.cuda(), n.cuda())
    nm = f"calib{C}x{M}-B{B}-{dt}"
    check(nm + " pos", eq(pc, pg))
    check(nm + " neg", eq(nc, ng))
    width = (R / n).double()
    for meth in ("entropy", "mse"):
        for sym in (True, False):
            for uns in (False, True):
                if not sym and uns:
                    continue
                a = Q.calib_search(pc, nc, width, n, meth, 8 if sym else 4, uns, sym, 1 if sym else 4, 128 if sym else 8)
                b = Q.calib_search(pg, ng, width.cuda(), n.cuda(), meth, 8 if sym else 4, uns, sym, 1 if sym else 4,
                                   128 if sym else 8)
                check(nm + f" {meth}-{sym}-{uns}", torch.allclose(a[0], b[0].cpu()) and torch.allclose(a[1], b[1].cpu()),
                      f"{a} {b}")


calib_cases = [(3, 5000, 512), (1, 100000, 2048), (70, 300, 256)]
if SMALL:
    calib_cases = [(3, 500, 256)]
for C_, M_, B_ in calib_cases:
    for dt in DT[:2]:
        run("calib", lambda: calib_case(C_, M_, B_, dt))


# ---------------------------------------------------------------- packed
def packed_case(N, K, gsz, bits, xdt, mdt, Ms):
    q = torch.randint(0, 2 ** bits, (N, K), generator=g, dtype=torch.uint8)
    qwc = Q.pack(q, bits)
    qwg = Q.pack(q.cuda(), bits)
    nm = f"pk{N}x{K}-g{gsz}-b{bits}-{xdt}-{mdt}"
    check(nm + " pack", eq(qwc, qwg))
    check(nm + " unpack", eq(Q.unpack(qwg, bits, K), q))
    G = K // gsz
    s = (torch.rand(N, G, generator=g) * 0.02 + 0.001).to(mdt)
    z = (torch.rand(N, G, generator=g) * 2 ** bits).to(mdt)
    dc = Q.dequantize(qwc, s, z, bits, gsz, K, torch.float32)
    dg = Q.dequantize(qwg, s.cuda(), z.cuda(), bits, gsz, K, torch.float32)
    check(nm + " deq", eq(dc, dg))
    bias = torch.randn(N, generator=g)
    for M in Ms:
        x = torch.randn(M, K, generator=g).to(xdt)
        ref = x.double() @ dc.double().t() + bias.double()
        yg = Q.packed_linear(x.cuda(), qwg, s.cuda(), z.cuda(), bits, gsz, K, bias.cuda())
        err = float((yg.cpu().double() - ref).abs().max())
        scl = float(ref.abs().max()) + 1e-6
        tol = 2e-3 if xdt == torch.float32 else 3e-2
        check(nm + f" linear M={M}", err / scl < tol, f"rel err {err / scl}")


pk_cases = [(3, 40, 40), (65, 96, 32), (130, 256, 128), (7, 4097, 4097), (64, 64, 64), (200, 320, 64)]
Ms = [1, 2, 3, 4, 5, 17, 130]
if SMALL:
    pk_cases = pk_cases[:3]
    Ms = [1, 3, 5, 70]
for N, K, gsz in pk_cases:
    for bits in (2, 3, 4):
        for xdt in DT:
            mdt = xdt
            run("pk", lambda: packed_case(N, K, gsz, bits, xdt, mdt, Ms))

torch.cuda.synchronize()
print(f"DONE fails={len(fails)}")
for f in fails[:80]:
    print(" ", f)
sys.exit(1 if fails else 0)
