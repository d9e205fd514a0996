"""Where a model's modules sit: the one walk the module-swapping tools share."""
from __future__ import annotations

from typing import Callable

from torch import nn


def module_sites(model: nn.Module, match: Callable[[nn.Module], bool]) -> list[tuple[list[str], list[tuple[nn.Module, str]], nn.Module]]:
    """Every submodule of ``model`` with ``match(module)`` true, once: ``(names, sites, module)``,
    its qualified names and every ``(parent, attribute)`` it sits at, in ``named_modules`` order.
    A module registered under several names (a shared layer, also twice under one parent) is
    listed once with all of them, so replacing it at every site keeps it shared."""
    found: dict[int, tuple[list, list, nn.Module]] = {}
    for parent_name, parent in model.named_modules():
        for child_name, child in parent._modules.items():  # (named_children() drops a parent's repeats)
            if child is not None and match(child):
                names, sites, _ = found.setdefault(id(child), ([], [], child))
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
                sites.append((parent, child_name))
    return list(found.values())
