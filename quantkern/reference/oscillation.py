"""Reference oscillation tracking, freezing and dampening (Nagel et al. 2022,
"Overcoming Oscillations in Quantization-Aware Training"; official code
Qualcomm-AI-research/oscillations-qat, ``TrackOscillation`` and ``dampening_loss``).

Two oracles, both plain PyTorch:

* :class:`OfficialTracker` restates the official ``TrackOscillation`` wrapper
  (full-size fp32 state: previous integer, last switch direction, frequency EMA,
  frozen mask, frozen integers, integer EMA) in our LSQ+ coordinates
  ``q = round(clamp((w - beta) / s, qmin, qmax))``.
* :func:`oscillation_update` is the same algorithm on the compact 8-byte state
  that the kernels keep (layout and numerics in csrc/shared/oscillation.h); the
  kernels must match it exactly on every integer field.

Per step (both)::

    q      = round(clamp((w - beta) / s, qmin, qmax))
    moved  = sign(q - q_prev)                    # official: sign(q_prev - q), same test
    osc    = moved != 0 and moved == -last_dir   # the integer reversed its last move
    f      = m * osc + (1 - m) * f
    last_dir <- moved where moved != 0;  q_prev <- q
    if freeze_threshold > 0:
        q_ema is initialised to q on the first such step
        freeze where f > freeze_threshold, at round(q_ema)   (q_ema before this step's update)
        q_ema = m * q + (1 - m) * q_ema

Where the compact state differs from the official code, on purpose:

1. Frozen weights keep their whole state (the official code keeps tracking them with
   the integer forced to the frozen value, and re-assigns the frozen integer to
   round(q_ema) while f > threshold). So: (a) the step after freezing, the official
   code may count one switch (from that step's integer to the frozen one) for the
   newly frozen weight, we count none; (b) their f decays after freezing, ours
   stays; (c) the frozen integer can only differ if q_ema sat within about m of a
   .5 tie when the weight froze (the official re-assignment then flips it).
2. f is a 20-bit fixed-point number (F / (2^20 - 1), F rounded to nearest each step):
   it stays within 0.5 / (m (2^20 - 1)) of the exact EMA (1e-5 at m = 0.05; the bound
   is reached only by rounding errors that all fall the same way), so a freezing
   decision can differ only for an f that close to the threshold.
3. The frozen integer is written back into the latent weight (w = q_frozen * s + beta)
   every step, so the next forward quantizes it to q_frozen; the official code
   instead overrides the integer inside the quantizer's forward. Two consequences:
   (a) the step size's gradient: officially the frozen integer is a constant, so a frozen
   weight contributes ``d x_hat / d s = q_frozen`` (and 1 to the offset), wherever q_frozen
   lies. ``OscillationTracker(frozen_grad="official")`` (opt-in; the default is "grid") restores exactly that
   with a forward hook on the weight quantizer; with ``frozen_grad="grid"`` the latent weight
   just sits on the grid point, v = q_frozen, and contributes ``round(v) - v = 0`` (and 0)
   unless q_frozen is qmin or qmax.
   (b) a weight frozen at step t is used at round(q_ema) from the next forward on;
   officially that forward still uses its unfrozen integer (the freeze is decided
   after the forward's integer was taken), so the frozen value applies one forward later.
"""
from __future__ import annotations

import torch

from .fake_quant_lsq import lsq_param_view

FREQ_ONE = 1048575.0  # 2^20 - 1: f = F / FREQ_ONE
FREQ_MASK = 0xFFFFF
FREQ_SHIFT = 12
UP_BIT, DOWN_BIT, FROZEN_BIT, LIVE_BIT = 8, 9, 10, 11


def integer_of(weight, scale, offset, qmin: int, qmax: int, axis=None, group_size=None) -> torch.Tensor:
    """q = round(clamp((w - beta) / s, qmin, qmax)) in fp32 (the integer the LSQ forward uses)."""
    wf = weight.float()
    s = lsq_param_view(wf, scale.float(), axis, group_size)
    b = lsq_param_view(wf, offset.float(), axis, group_size)
    return torch.round(torch.clamp((wf - b) / s, qmin, qmax))


# ------------------------------------------------------------------ compact state
def encode_state(q_prev, up, down, frozen, live, F) -> torch.Tensor:
    """Pack the fields (integer-valued tensors) into the int32 meta plane."""
    v = (
        (q_prev.to(torch.int64) & 0xFF)
        | (up.to(torch.int64) << UP_BIT)
        | (down.to(torch.int64) << DOWN_BIT)
        | (frozen.to(torch.int64) << FROZEN_BIT)
        | (live.to(torch.int64) << LIVE_BIT)
        | (F.to(torch.int64) << FREQ_SHIFT)
    )
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)  # reinterpret as int32


def decode_state(meta: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fields of the meta plane: q_prev (int, -128..127), last_dir (-1/0/+1), frozen, ema_live (bool), F (int)."""
    m = meta.to(torch.int64) & 0xFFFFFFFF
    q = m & 0xFF
    q = torch.where(q >= 128, q - 256, q)
    up = (m >> UP_BIT) & 1
    down = (m >> DOWN_BIT) & 1
    return {
        "q_prev": q,
        "last_dir": up - down,
        "up": up,
        "down": down,
        "frozen": ((m >> FROZEN_BIT) & 1).bool(),
        "ema_live": ((m >> LIVE_BIT) & 1).bool(),
        "F": (m >> FREQ_SHIFT) & FREQ_MASK,
    }


def frequency(meta: torch.Tensor) -> torch.Tensor:
    """The oscillation-frequency EMA f in [0, 1] (fp32)."""
    return decode_state(meta)["F"].float() / FREQ_ONE


def init_state(weight, scale, offset, qmin: int, qmax: int, axis=None, group_size=None):
    """(meta int32, ema fp32), both shaped like weight: q_prev = the current integer, nothing else yet."""
    if not (-128 <= qmin < qmax <= 127):
        raise ValueError(f"oscillation state keeps the integer in int8: need -128 <= qmin < qmax <= 127, got {qmin}, {qmax}")
    q = integer_of(weight, scale, offset, qmin, qmax, axis, group_size).to(torch.int64)
    z = torch.zeros_like(q)
    return encode_state(q, z, z, z, z, z), torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)


def oscillation_update(weight, scale, offset, meta, ema, qmin: int, qmax: int, axis=None, group_size=None,
                       momentum: float = 0.01, freeze_threshold: float = 0.0):
    """One step on the compact state. Pure: returns (new_weight, new_meta, new_ema, counts int64 [2])."""
    dev = weight.device
    f32 = lambda v: torch.tensor(v, dtype=torch.float32, device=dev)  # noqa: E731
    m = f32(momentum)
    om = 1 - m                              # fp32, as the kernels
    mS = m * FREQ_ONE                       # fp32
    thF = f32(freeze_threshold * FREQ_ONE)  # rounded once from double
    wf = weight.float()
    s = lsq_param_view(wf, scale.float(), axis, group_size)
    b = lsq_param_view(wf, offset.float(), axis, group_size)

    st = decode_state(meta)
    q = torch.round(torch.clamp((wf - b) / s, qmin, qmax))
    qp = st["q_prev"].float()
    up, down = st["up"].bool(), st["down"].bool()
    F = st["F"].float()
    was_frozen, live = st["frozen"], st["ema_live"]

    moved_up, moved_down = q > qp, q < qp
    osc = (moved_up & down) | (moved_down & up)
    F1 = torch.round(om * F + osc.float() * mS).clamp_max(FREQ_ONE)
    up1 = moved_up | (up & ~moved_down)
    down1 = moved_down | (down & ~moved_up)
    qp1, frozen1, ema1, live1 = q, torch.zeros_like(was_frozen), ema, live
    if freeze_threshold > 0:
        ema_eff = torch.where(live, ema, q)
        new_frozen = F1 > thF
        qp1 = torch.where(new_frozen, torch.round(ema_eff), q)
        frozen1 = new_frozen
        ema1 = m * q + om * ema_eff
        live1 = torch.ones_like(live)
    # frozen weights keep their whole state
    qp1 = torch.where(was_frozen, qp, qp1)
    up1 = torch.where(was_frozen, up, up1)
    down1 = torch.where(was_frozen, down, down1)
    F1 = torch.where(was_frozen, F, F1)
    frozen1 = was_frozen | frozen1
    ema1 = torch.where(was_frozen, ema, ema1)
    live1 = torch.where(was_frozen, live, live1)

    w_frozen = (qp1 * s + b).to(weight.dtype)
    new_w = torch.where(frozen1, w_frozen, weight)
    new_meta = encode_state(qp1, up1, down1, frozen1, live1, F1)
    counts = torch.stack([(osc & ~was_frozen).sum(), frozen1.sum()]).to(torch.int64)
    return new_w, new_meta, ema1.float(), counts


# ------------------------------------------------------------------ official algorithm
class OfficialTracker:
    """The official ``TrackOscillation`` algorithm with full-size fp32 state, restated.

    ``step(weight, scale, offset)`` runs what the official wrapper does in one forward,
    with ``x_int`` = our LSQ+ integer; it returns the integer the forward would use
    (frozen ones replaced by their frozen value). Attributes after a step:
    ``prev_x_int``, ``prev_switch_dir`` (sign(prev - new) convention), ``ema_oscillation``,
    ``frozen``, ``frozen_x_int``, ``ema_x_int``, ``oscillated_sum``.
    """

    def __init__(self, qmin, qmax, axis=None, group_size=None, momentum=0.01, freeze_threshold=0.0):
        self.qmin, self.qmax, self.axis, self.group_size = qmin, qmax, axis, group_size
        self.momentum = momentum
        self.freeze_threshold = freeze_threshold
        self.prev_x_int = None
        self.prev_switch_dir = None
        self.ema_oscillation = None
        self.oscillated_sum = None
        self.frozen = None
        self.frozen_x_int = None
        self.ema_x_int = None

    @torch.no_grad()
    def step(self, weight, scale, offset):
        x_int = integer_of(weight, scale, offset, self.qmin, self.qmax, self.axis, self.group_size)
        if self.frozen is not None:
            x_int = torch.where(self.frozen, self.frozen_x_int, x_int)
        if self.prev_x_int is None:
            self.prev_switch_dir = torch.zeros_like(x_int)
            self.prev_x_int = x_int.clone()
            self.ema_oscillation = torch.zeros_like(x_int)
        if self.frozen is None and self.freeze_threshold > 0:
            self.frozen = torch.zeros_like(x_int, dtype=torch.bool)
            self.frozen_x_int = torch.zeros_like(x_int)
            self.ema_x_int = x_int.clone()

        delta = torch.round(self.prev_x_int - x_int)
        switch_dir = torch.sign(delta)
        switched = delta != 0
        oscillated = (self.prev_switch_dir * switch_dir) == -1
        m = self.momentum
        self.ema_oscillation = m * oscillated + (1 - m) * self.ema_oscillation
        self.prev_switch_dir = torch.where(switched, switch_dir, self.prev_switch_dir)
        self.prev_x_int = x_int
        self.oscillated_sum = int(oscillated.sum())
        if self.freeze_threshold > 0:
            freeze = self.ema_oscillation > self.freeze_threshold
            self.frozen = self.frozen | freeze
            self.frozen_x_int = torch.where(freeze, torch.round(self.ema_x_int), self.frozen_x_int)
            self.ema_x_int = m * x_int + (1 - m) * self.ema_x_int
        return x_int


# ------------------------------------------------------------------ dampening
def dampening_loss(weight, scale, offset, qmin: int, qmax: int, axis=None, group_size=None, norm: float = 1.0):
    """norm * sum((q*s + beta).detach() - clamp(w, s*qmin + beta, s*qmax + beta))^2 (0-d fp32).

    Gradient flows to ``weight`` only (target and clamp bounds are detached). The
    official code (``dampening_loss(..., aggregation="kernel_mean")``) uses
    ``loss.sum(0).mean()`` = sum / (numel / shape[0]), i.e. norm = shape[0] / numel.
    """
    wf = weight.float()
    s = lsq_param_view(wf, scale.float().detach(), axis, group_size)
    b = lsq_param_view(wf, offset.float().detach(), axis, group_size)
    with torch.no_grad():
        target = torch.round(torch.clamp((wf - b) / s, qmin, qmax)) * s + b
        lo, hi = qmin * s + b, qmax * s + b
    # clamp with tensor bounds: gradient 1 where lo <= w <= hi
    wc = torch.minimum(torch.maximum(wf, lo), hi)
    inside = (wf >= lo) & (wf <= hi)
    wc = torch.where(inside, wf, wc.detach())  # value clamp(w), gradient `inside` (w = +-inf: clamped, no inf * 0)
    d = wc - target
    return (d.double().square().sum() * norm).float()
