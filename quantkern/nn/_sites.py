"""Where a model's modules sit: the one walk the module-swapping tools share."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

from torch import nn

# undo actions of the changes made inside ``undo_swaps_on_error`` (None outside it); a ContextVar, so
# that a conversion failing in one thread cannot undo another thread's changes
_journal: contextvars.ContextVar = contextvars.ContextVar("quantkern_swap_journal", default=None)


@contextlib.contextmanager
def undo_swaps_on_error():
    """Inside this block, every :func:`swap_module` and :func:`set_undoably` (of this thread / context)
    is recorded; if the block raises, each is undone in reverse order (``old`` back at its sites, with
    the reparametrization pre-hooks the swap took off it; the attribute's old value), so a converter
    that fails after exposing a model's hidden linears (``expose_linears``) leaves it as it came.
    Nests (an inner block's changes are undone by the outer one too)."""
    outer = _journal.get()
    mine: list = []
    token = _journal.set(mine)
    try:
        yield
    except BaseException:
        for undo in reversed(mine):
            undo()
        raise
    finally:
        _journal.reset(token)
        if outer is not None:
            outer.extend(mine)


def _record(undo: Callable[[], None]) -> None:
    journal = _journal.get()
    if journal is not None:
        journal.append(undo)


def set_undoably(obj, attr: str, value) -> None:
    """``setattr(obj, attr, value)``, undone if an enclosing :func:`undo_swaps_on_error` block raises."""
    old = getattr(obj, attr)
    _record(lambda: setattr(obj, attr, old))
    setattr(obj, attr, value)


def module_sites(model: nn.Module, match: Callable[[nn.Module], bool]) -> list[tuple[list[str], list[tuple[nn.Module, str]], nn.Module]]:
    """Every submodule of ``model`` with ``match(module)`` true, once: ``(names, sites, module)``,
    its qualified names and every ``(parent, attribute)`` it sits at, in ``named_modules`` order
    (``names[0]`` is the name ``model.named_modules()`` gives it).
    A module registered under several names (a shared layer, also twice under one parent) is
    listed once with all of them, so replacing it at every site keeps it shared. ``names`` also
    holds the paths through a shared ancestor (``enc.layers[1] = enc.layers[0]``: ``layers.0.fc``
    and ``layers.1.fc``), so a skip given under any name a user can see matches; ``sites`` lists
    each (parent, attribute) pair once."""
    found: dict[int, tuple[list, list, nn.Module]] = {}
    seen_sites: set[tuple[int, str]] = set()

    # A depth-first walk over every path (named_modules(remove_duplicate=False) order), guarded
    # against a module that holds one of its ancestors (that would recurse forever).
    def walk(parent: nn.Module, parent_name: str, on_path: set[int]) -> None:
        on_path.add(id(parent))
        for child_name, child in parent._modules.items():  # (named_children() drops a parent's repeats)
            if child is None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if match(child):
                names, sites, _ = found.setdefault(id(child), ([], [], child))
                names.append(name)
                if (id(parent), child_name) not in seen_sites:
                    seen_sites.add((id(parent), child_name))
                    sites.append((parent, child_name))
            if id(child) not in on_path:
                walk(child, name, on_path)
        on_path.discard(id(parent))

    walk(model, "", set())
    return list(found.values())


_CALL_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def swap_module(sites: list[tuple[nn.Module, str]], old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` at every ``(parent, attribute)`` of ``sites`` in place of ``old``, with ``old``'s
    train / eval mode and its forward / backward hooks (the same dicts, so the handles the user holds
    still remove them: a hook on a layer keeps firing after the layer is converted), except the
    pre-hooks of torch's hook-based prune / weight_norm / spectral_norm, which leave ``old`` too
    (``new`` holds the weight they computed: :func:`refresh_hooked_weights`). Returns ``new``."""
    pre = old.__dict__.get("_forward_pre_hooks")
    _record(lambda sites=list(sites), saved=None if pre is None else dict(pre): _unswap(sites, old, saved))
    new.train(old.training)
    for a in _CALL_HOOKS:
        if a in old.__dict__:
            setattr(new, a, getattr(old, a))
    # torch.nn.utils.prune / weight_norm / spectral_norm recompute old.weight (or in_proj_weight) from
    # state only the old module has (weight_orig, weight_mask, weight_g, ...) in a forward pre-hook:
    # the new module was built from the weight they computed, and on it they crashed every forward
    pre = old.__dict__.get("_forward_pre_hooks")
    if pre:
        for k in [k for k, h in pre.items() if isinstance(h, _reparam_hook_types())]:
            del pre[k]
    if "_is_full_backward_hook" in old.__dict__:
        new._is_full_backward_hook = old._is_full_backward_hook
    for parent, attr in sites:
        setattr(parent, attr, new)
    return new


def _unswap(sites: list, old: nn.Module, pre: dict | None) -> None:
    """Undo a :func:`swap_module`: ``old`` back at ``sites``, its forward pre-hooks as they were."""
    for parent, attr in sites:
        setattr(parent, attr, old)
    if pre is not None:
        hooks = old.__dict__["_forward_pre_hooks"]
        hooks.clear()
        hooks.update(pre)


def _reparam_hook_types() -> tuple:
    """The forward pre-hook classes of torch's hook-based weight reparametrizations."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    return (prune.BasePruningMethod, WeightNorm, SpectralNorm)


def refresh_hooked_weights(model: nn.Module) -> None:
    """Recompute every weight that torch's hook-based reparametrizations derive in a forward pre-hook
    (prune: ``weight_orig * weight_mask``; weight_norm: ``g v / |v|``; spectral_norm: ``W / sigma``,
    without a power iteration), so that a converter reads the current weight even after an
    optimizer step with no forward since (it packed the stale one, then dropped the hook). Runs in
    the caller's grad mode, as a forward would: the recomputed weight requires grad as before (a
    QAT conversion copies that flag)."""
    prune_t, wn_t, sn_t = _reparam_hook_types()
    for m in model.modules():
        for h in list(m._forward_pre_hooks.values()):
            if isinstance(h, (prune_t, wn_t)):
                h(m, None)
            elif isinstance(h, sn_t):
                setattr(m, h.name, h.compute_weight(m, do_power_iteration=False))

