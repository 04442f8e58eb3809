"""Shared helpers of the test modules."""

from __future__ import annotations

from torch import Tensor, nn


def module_from(state: dict[str, Tensor]) -> nn.Module:
    """An nn.Module whose state_dict() has exactly `state`'s dotted names."""
    root = nn.Module()
    for key, t in state.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        if t.is_floating_point():
            mod.register_parameter(leaf, nn.Parameter(t.clone()))
        else:
            mod.register_buffer(leaf, t.clone())
    return root
