"""Cached block inputs for ``quantize_``'s calibration passes.

Without them every calibration pass of a layer reruns the model from its start up to that
layer, so the forwards grow with the square of the depth. Most models to quantize run a list
of blocks one after the other (a transformer's ``layers`` / ``encoder.layer`` / ``h``, an
``nn.Sequential``), each reading the previous one's output: then each calibration unit's input
to the current block can be kept, a pass of a layer in block ``j`` runs block ``j`` alone on
it, and once block ``j``'s layers are quantized, block ``j`` runs once per unit to give the
inputs of block ``j + 1``. The block computes exactly what it computes inside the whole
model's forward (same module, same arguments, same grad / inference mode), so the statistics,
and the quantized model, are bit-identical to rerunning the model.

That is only true when the model really is such a chain, which :func:`plan_blocks` checks on
every calibration unit before anything is quantized (one forward of the float model per unit,
stopped after the last block). For a candidate list (an ``nn.ModuleList`` / ``nn.Sequential``
with at least two children holding layers to quantize):

* each child is called exactly once, in order (the first time round, when a unit runs the
  model twice);
* block ``j > 0`` gets the previous block's output (or its first element, for blocks that return
  a tuple) as its first positional argument, the very tensor, and every other argument is the
  very object block 0 got (an attention mask, position embeddings, ``use_cache=False``), another
  element of the previous block's output tuple (T5's position bias, which block 0 makes and every
  block hands on: replayed from that element, so it follows the quantized blocks), or a
  number / string / None: one equal to block 0's is taken from each unit (as block 0's is), one
  that differs (a layer index, a drop-path rate) is replayed as the probe saw it, so every other
  calibration unit, and the first one rerun with block 0's input perturbed, must show the same
  per-block values (a token count per stage of a pooling model, or a number computed from the
  hidden states, would not), or a tensor (tuple) of its own that does not follow the hidden states (a
  per-layer-type attention mask or position embedding, Gemma 2 / 3's sliding and global layers):
  checked by rerunning the first unit with block 0's input perturbed (those tensors must come out
  equal), then captured per unit by running the model up to the last block that gets one;
* those other arguments are tensors, numbers, strings, None or tuples / lists / dicts of them,
  none changed in place between blocks; a stateful object (a transformers KV ``Cache`` that
  every block appends to) cannot be replayed: the model is then rerun from its start (and
  ``quantize_`` says so: calibrate with ``use_cache=False``);
* no block changes its arguments in place (its input, a mask, a dict it updates), nothing changes
  a block's output before the next block reads it, and what each unit passes is not changed by a
  later unit (a buffer the model rewrites every forward: caught at capture, the list is then
  dropped); autocast is off. A replay runs outside the unit's callable, so a context it sets
  around the model call is not in effect (documented at ``QuantizeConfig.block_cache``).

The layers inside the list must come in block order in ``quantize_``'s layer list, with no
layer outside the list between them, each inside one block only. A list that fails any check
is not used. Several lists are used when their layers do not overlap (an encoder's and a
decoder's blocks, CLIP's two towers), one after the other, each cache captured when its first
layer comes (running the model, with the earlier lists final, up to its block 0) and freed after
its last; of nested lists the better ranked one (:func:`_candidates`). Layers outside every
chosen list take the rerun-from-start path.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a calibration hook to end the forward once what it needs is captured."""


_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.Size)


def _leaves(v):
    """The non-container values of an argument (through nested tuples / lists / dict values)."""
    if isinstance(v, (tuple, list)):
        for e in v:
            yield from _leaves(e)
    elif isinstance(v, dict):
        for e in v.values():
            yield from _leaves(e)
    else:
        yield v


def _plain(v) -> bool:
    return all(isinstance(e, (torch.Tensor,) + _PLAIN) for e in _leaves(v))


def _sig(v):
    """A fingerprint of an argument that changes when it, or anything in it, is changed in place:
    tensors by identity and version counter (None for inference tensors, which have none), tuples /
    lists / dicts by their contents (a dict a block updates changes it), other values by value."""
    if isinstance(v, torch.Tensor):
        try:
            return ("t", id(v), v._version)
        except RuntimeError:
            return ("t", id(v), None)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_sig(e) for e in v))
    if isinstance(v, dict):
        return ("dict", tuple((k, _sig(e)) for k, e in v.items()))
    return ("v", v) if isinstance(v, _PLAIN) else ("o", id(v))


def _tensor_bytes(v, seen: set) -> int:
    """Bytes of the tensors in an argument not counted yet (``seen``: their ids, updated)."""
    n = 0
    for t in _leaves(v):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def _scalar(v) -> bool:
    return isinstance(v, (type(None), bool, int, float, str))


def _autocast_on() -> bool:
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


def _hidden(out):
    """A block's output as the next block's input: the tensor, or a tuple's first element."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class _Probe:
    """Hooks on one candidate list's blocks during the probe forward; ``why`` is None while it fits."""

    def __init__(self, name: str, blocks: list, block_of: dict):
        self.name, self.blocks, self.n = name, blocks, len(blocks)
        self.next, self.why, self.nonplain = 0, None, None
        # the layers (ids, -> block) that ran while their own block was running; a layer registered in
        # a block but called from outside it (after the list) would see no input in a replay
        self.block_of, self.active, self.ran_inside = block_of, None, set()
        self.rest = self.kw = self.ver = self.prev = self.prev_out = self.outsig = self.argrefs = self.argsig = None
        self.in_bytes, self.device, self.x0_float, self.seen = 0, None, None, set()
        # per block, keyed by position in args[1:] or keyword: its own scalar arguments (-> value), the
        # arguments that are an element of the previous block's output (-> index in that tuple), and
        # other tensor arguments of its own (-> the value seen: a per-layer-type mask, checked later)
        self.own: list[dict] = []
        self.carry: list[dict] = []
        self.loose: list[dict] = []
        self.handles = []
        for j, b in enumerate(blocks):
            # prepend: see the arguments before any user pre-hook rewrites them (a replay calls the
            # block, which runs those hooks again)
            self.handles.append(b.register_forward_pre_hook(self._pre(j), with_kwargs=True, prepend=True))
            self.handles.append(b.register_forward_hook(self._post(j), with_kwargs=True))
            for m in b.modules():
                if block_of.get(id(m)) == j:
                    self.handles.append(m.register_forward_pre_hook(self._layer(j)))

    def _layer(self, j: int):
        def pre(module, args):
            if self.active == j:
                self.ran_inside.add(id(module))
            elif self.why is None and self.next < self.n:
                self.fail(f"a layer of block {j} ran outside that block's call")
        return pre

    def fail(self, why: str) -> None:
        if self.why is None:
            self.why = why

    def _pre(self, j: int):
        def pre(module, args, kwargs):
            if self.why is not None or self.next >= self.n:  # (a unit's second run of the model: ignored)
                return
            if j != self.next:
                return self.fail(f"block {j} was called when block {self.next} was expected")
            if not args or not isinstance(args[0], torch.Tensor):
                return self.fail(f"block {j}'s first positional argument is not a tensor")
            if _autocast_on():
                return self.fail("autocast is on")
            rest = args[1:]
            if j == 0:
                bad = [(f"argument {i + 1}", v) for i, v in enumerate(rest) if not _plain(v)]
                bad += [(f"argument {k!r}", v) for k, v in kwargs.items() if not _plain(v)]
                if bad:
                    self.nonplain = f"{bad[0][0]} of type {type(bad[0][1]).__name__}"
                    return self.fail(f"block 0's {self.nonplain} cannot be replayed")
                self.rest, self.kw = rest, dict(kwargs)
                self.ver = {k: _sig(v) for k, v in list(enumerate(rest)) + list(kwargs.items())}
                self.own.append({})
                self.carry.append({})
                self.loose.append({})
            else:
                if args[0] is not self.prev:
                    return self.fail(f"block {j}'s input is not block {j - 1}'s output")
                if _sig(self.prev_out) != self.outsig:  # (a replay would feed the unchanged output)
                    return self.fail(f"block {j - 1}'s output was changed in place before block {j}")
                if len(rest) != len(self.rest) or kwargs.keys() != self.kw.keys():
                    return self.fail(f"block {j}'s arguments are not block 0's")
                own, carry, loose = {}, {}, {}
                out = self.prev_out if isinstance(self.prev_out, (tuple, list)) else ()
                for key, a, b in [(i, a, self.rest[i]) for i, a in enumerate(rest)] + \
                        [(k, v, self.kw[k]) for k, v in kwargs.items()]:
                    if a is b:
                        if _sig(a) != self.ver[key]:
                            return self.fail(f"block 0's argument {key!r} was changed in place before block {j}")
                    elif isinstance(a, torch.Tensor) and any(a is e for e in out[1:]):
                        # handed on from block to block (T5's position bias, made by block 0)
                        carry[key] = next(i for i, e in enumerate(out) if e is a)
                    elif _scalar(a) and _scalar(b):
                        if a != b:  # (an equal one, e.g. a length computed per block, stays the unit's own)
                            own[key] = a
                    elif _plain(a):  # its own tensor(s): replayable if they do not follow the hidden states
                        loose[key] = a
                    else:
                        return self.fail(f"block {j}'s argument {key!r} ({type(a).__name__}) cannot be replayed")
                self.own.append(own)
                self.carry.append(carry)
                self.loose.append(loose)
                kept = [a for i, a in enumerate(rest) if i in carry or i in loose]
                kept += [v for k, v in kwargs.items() if k in carry or k in loose]
                self.in_bytes += _tensor_bytes(kept, self.seen)
            if j == 0:  # what a cache holds per unit: block 0's arguments (then what later blocks add)
                self.in_bytes, self.device = _tensor_bytes((args, kwargs), self.seen), args[0].device
                self.x0_float = args[0].is_floating_point()
            self.prev = None
            self.argrefs = (args, dict(kwargs))
            self.argsig = _sig(self.argrefs)
            self.active = j
        return pre

    def _post(self, j: int):
        def post(module, args, kwargs, out):
            if self.why is not None or j != self.next:
                return
            self.active = None
            # (the arguments as the block got them, before any user pre-hook replaced some)
            if _sig(self.argrefs) != self.argsig:  # its input, a mask, a dict it updates, ...
                return self.fail(f"block {j} changed one of its arguments in place")
            self.argrefs, self.prev_out, self.outsig = None, out, _sig(out)
            self.prev = _hidden(out)
            if self.prev is None:
                return self.fail(f"block {j}'s output is not a tensor or a tuple starting with one")
            self.next += 1
        return post

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.rest = self.kw = self.prev = self.prev_out = self.argrefs = None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: ``mem_get_info``; CPU: /proc/meminfo's MemAvailable); None if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


class BlockPlan:
    """The block list chosen for cached calibration, and each layer's block in it."""

    def __init__(self, name: str, blocks: list, block_of: dict, first: int, last: int, probe: _Probe):
        self.name, self.blocks, self.block_of, self.first, self.last = name, blocks, block_of, first, last
        self.own = probe.own  # per block: the scalar arguments it gets instead of block 0's
        self.carry = probe.carry  # per block: the arguments it takes from the previous block's output (-> index)
        self.loose = [set(d) for d in probe.loose]  # per block: the arguments captured per unit for it
        self.in_bytes, self.device = probe.in_bytes, probe.device  # what the first unit's cache keeps, and where

    def too_big(self, n_units: int, copies: int = 1) -> str | None:
        """Why not to cache (None: fine): ``copies`` x ``n_units`` times what the first unit's cache
        keeps (block inputs, masks, carried and per-block tensors) would take more than half of the
        memory free on their device."""
        need, free = self.in_bytes * n_units * copies, available_bytes(self.device)
        if free is None or 2 * need <= free:
            return None
        return (f"caching {n_units} calibration inputs of {self.name or 'the model'}'s blocks would take about "
                f"{need / 2**30:.1f} GiB, more than half of the {free / 2**30:.1f} GiB free on {self.device}")


def _candidates(model: nn.Module, layers: list) -> list:
    """``(name, blocks, block_of)`` for every ModuleList / Sequential whose children hold layers of
    ``layers`` (quantize_'s ``(name, sites, layer)`` list) in at least two of them, each layer in
    one child only (its every site too). Best first: the most (layers covered) x (blocks holding
    layers), roughly the forwards the cache saves (a Swin's list of stages, not one stage's blocks;
    a Llama's decoder layers, not a Sequential of embedding / layers / head around them)."""
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        blocks = list(mod)
        inside = [{id(m) for m in b.modules()} for b in blocks]
        block_of, ok = {}, True
        for _, sites, lin in layers:
            js = [j for j, ids in enumerate(inside) if id(lin) in ids]
            if len(js) > 1 or (js and any(id(p) not in inside[js[0]] for p, _ in sites)):
                ok = False  # shared across blocks, or also registered outside its block
                break
            if js:
                block_of[id(lin)] = js[0]
        if ok and len(set(block_of.values())) >= 2:
            out.append((name, blocks, block_of))
    out.sort(key=lambda c: -len(c[2]) * len(set(c[2].values())))
    return out


def plan_blocks(model: nn.Module, layers: list, run_first_unit: Callable[[], object], run_other_units=()):
    """Choose the block lists for cached calibration (module docstring); ``(plans, note)``, ``plans``
    a list of :class:`BlockPlan` in layer order whose layer ranges do not overlap (an encoder's and a
    decoder's blocks; of nested lists, the better ranked). ``run_first_unit()`` / each of
    ``run_other_units`` runs the model (still float) on one calibration unit; each is stopped once
    the candidate lists' last blocks have run. Every unit must show the same chain (the same blocks
    called, the same per-block values); a list whose blocks get tensors of their own is also checked
    by rerunning the first unit with block 0's input perturbed: those tensors must not change.
    ``note`` names a candidate outside every plan that failed only for an argument that cannot be
    replayed (a KV cache), else is None."""
    cands = _candidates(model, layers)
    if not cands:
        return [], None
    probes = _probe(cands, run_first_unit)
    chosen, refused = [], []
    for p, cand in zip(probes, cands):
        name, blocks, block_of = cand
        idx = [i for i, (_, _, lin) in enumerate(layers) if id(lin) in block_of]
        span = (idx[0], idx[-1])
        if any(span[0] <= c[1][1] and c[1][0] <= span[1] for c in chosen):
            continue  # overlaps a better-ranked list (nested in it, or around it)
        if p.why is not None:
            if p.nonplain:
                refused.append((span, f"{name or 'the model'}: block 0's {p.nonplain}"))
            continue
        order = [block_of[id(layers[i][2])] for i in idx]
        if idx[-1] - idx[0] + 1 != len(idx) or order != sorted(order):
            continue  # another layer between them, or not in block order
        chosen.append((cand, span, p))
    # every other unit: the same chain (a unit that skips blocks, or per-block values that follow the
    # data, e.g. a token count per pooling stage, would make the replay differ)
    for run in run_other_units:
        if not chosen:
            break
        qs = _probe([c for c, _, _ in chosen], run)
        chosen = [(c, span, p) for (c, span, p), q in zip(chosen, qs)
                  if q.why is None and (q.own, q.carry) == (p.own, p.carry)
                  and [set(d) for d in q.loose] == [set(d) for d in p.loose]]
    chosen = [(c, span, p) for c, span, p in chosen
              if not (any(p.loose) or any(p.own)) or _stable(c, run_first_unit, p)]
    plans = sorted((BlockPlan(c[0], c[1], c[2], span[0], span[1], p) for c, span, p in chosen), key=lambda q: q.first)
    note = next((why for (a, b), why in refused if not any(a <= q.last and q.first <= b for q in plans)), None)
    return plans, note


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _stable(cand, run: Callable[[], object], p: _Probe) -> bool:
    """Rerun the first unit with block 0's input perturbed (noise of the size of its spread): the
    values and tensors blocks get of their own (``p.own``, ``p.loose``) must come out equal, i.e. they
    are made before the chain and do not follow its hidden states (masks and position embeddings per
    layer type, a drop-path rate; not a number computed from the hidden states)."""
    def perturb(module, args, kwargs):
        x = args[0]
        g = torch.Generator(device=x.device).manual_seed(0)
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return (x + noise * (x.detach().float().std() + 1).to(x.dtype),) + tuple(args[1:]), kwargs
    if not p.x0_float:
        return False  # (an integer block input cannot be perturbed)
    h = cand[1][0].register_forward_pre_hook(perturb, with_kwargs=True)  # after the probe's (prepended) hook
    try:
        q = _probe([cand], run)[0]
    finally:
        h.remove()
    return q.why is None and q.own == p.own and len(q.loose) == len(p.loose) and all(
        d.keys() == e.keys() and all(_same(d[k], e[k]) for k in d) for d, e in zip(p.loose, q.loose))


def _probe(cands: list, run: Callable[[], object]) -> list:
    """One unit's forward (``run()``) with a :class:`_Probe` on each candidate, stopped once their last
    blocks have run; the probes, ``why`` set for every candidate that is not a chain."""
    probes = [_Probe(name, blocks, block_of) for name, blocks, block_of in cands]

    def stop_when_done(module, args, kwargs, out):
        if all(p.why is not None or p.next >= p.n for p in probes):
            raise StopForward
    # after the probes' own post hooks (registered first), on every candidate's last block
    stops = [p.blocks[-1].register_forward_hook(stop_when_done, with_kwargs=True) for p in probes]
    try:
        try:
            run()
        except StopForward:
            pass
    finally:
        for h in stops:
            h.remove()
        for p in probes:
            p.remove()
    for p in probes:
        if p.why is None and p.next < p.n:
            p.why = f"only {p.next} of its {p.n} blocks ran"
        if p.why is None and len(p.ran_inside) < len(p.block_of):
            p.why = "a layer of one of its blocks did not run inside that block's call"
    return probes


class _Unit:
    """One calibration unit's arguments to the current block."""
    __slots__ = ("x", "rest", "kw", "mode", "carried", "loose")

    def __init__(self, x, rest, kw, mode, loose):
        self.x, self.rest, self.kw, self.mode = x, rest, kw, mode  # mode: (grad, inference) at block 0's call
        self.carried = {}  # the arguments the current block takes from the previous block's output
        self.loose = loose  # block -> {argument: the unit's own tensor(s) for that block}


def _kept(t):
    return t.detach() if isinstance(t, torch.Tensor) and t.requires_grad else t


def fitting(op: str, plans: list, n_units: int, copies: int = 1) -> list:
    """``plans`` less those whose caches would not fit in memory (:meth:`BlockPlan.too_big`), each
    dropped with a warning from ``op``."""
    kept = []
    for p in plans:
        why = p.too_big(n_units, copies)
        if why is None:
            kept.append(p)
        else:
            warnings.warn(f"{op}: {why}; its calibration passes rerun the model from its start instead "
                          "(slower on deep models; block_cache=False turns the cache, and this warning, off)",
                          stacklevel=3)
    return kept


class BlockInputs:
    """Every calibration unit's input to block ``j`` of one model (the one being quantized, or the
    float copy): a :class:`_Unit` per unit, None for a unit that never reached block 0."""

    def __init__(self, plan: "BlockPlan", blocks: list | None = None):
        """``plan``'s blocks (or ``blocks``: the same list in the float copy) and per-block arguments.
        ``why``: after :meth:`capture`, None, or why these inputs cannot be replayed."""
        self.blocks = plan.blocks if blocks is None else blocks
        self.own, self.carry, self.loose, self.j, self.items = plan.own, plan.carry, plan.loose, 0, []
        self.why = None

    def capture(self, calls: list) -> None:
        """Run each unit (``call()`` runs the whole model) up to block 0 (or up to the last block that
        gets tensors of its own, which are kept too) and keep its arguments."""
        got, sigs, last = [], [], max((j for j, keys in enumerate(self.loose) if keys), default=0)

        def pre0(module, args, kwargs):
            got.append(_Unit(_kept(args[0]), args[1:], dict(kwargs),
                             (torch.is_grad_enabled(), torch.is_inference_mode_enabled()), {}))
            if last == 0:
                raise StopForward

        def pre(j):
            def hook(module, args, kwargs):
                if got and got[-1] is not None and j not in got[-1].loose:
                    got[-1].loose[j] = {k: args[1 + k] if isinstance(k, int) else kwargs[k] for k in self.loose[j]}
                if j == last:
                    raise StopForward
            return hook
        hs = [self.blocks[0].register_forward_pre_hook(pre0, with_kwargs=True, prepend=True)]
        hs += [self.blocks[j].register_forward_pre_hook(pre(j), with_kwargs=True, prepend=True)
               for j in range(1, len(self.blocks)) if self.loose[j]]
        try:
            for call in calls:
                n = len(got)
                try:
                    call()
                except StopForward:
                    pass
                if len(got) == n:
                    got.append(None)
                elif len(got) > n + 1:  # block 0 ran twice before the stop: only the first call counts
                    del got[n + 1:]
                u = got[-1]
                sigs.append(None if u is None else _sig((u.x, u.rest, u.kw, u.loose)))
        finally:
            for h in hs:
                h.remove()
        self.items, self.j = got, 0
        # what is kept must still be what each unit passed: a model that writes every forward's mask
        # into one buffer it passes on would leave every unit with the last unit's
        if any(u is not None and sig != _sig((u.x, u.rest, u.kw, u.loose)) for u, sig in zip(got, sigs)):
            self.why = "an argument the model passed to its blocks was changed by a later calibration unit"

    def _call(self, u: _Unit):
        over = {**self.own[self.j], **u.carried, **u.loose.get(self.j, {})}
        rest, kw = u.rest, u.kw
        if over:
            rest = tuple(over.get(i, a) for i, a in enumerate(rest))
            kw = {k: over.get(k, v) for k, v in kw.items()}
        grad, inference = u.mode
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return self.blocks[self.j](u.x, *rest, **kw)

    def run(self, u: int) -> None:
        """Block ``j`` on unit ``u``'s input: one calibration pass (its hooks may stop it)."""
        if self.items[u] is not None:
            self._call(self.items[u])

    def advance(self, to: int) -> None:
        """Run blocks ``j .. to - 1`` (their layers are final by now) so the inputs are block ``to``'s."""
        while self.j < to:
            for unit in self.items:
                if unit is not None:
                    out = self._call(unit)
                    unit.x = _kept(_hidden(out))
                    unit.carried = {k: _kept(out[i]) for k, i in self.carry[self.j + 1].items()}
                    unit.loose.pop(self.j, None)  # (this block's own tensors are no longer needed)
            self.j += 1
