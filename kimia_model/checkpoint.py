"""Strict, readable checkpoint loading shared by the model modules.

``load_state_dict(strict=True)`` stops at the first problem with a message listing raw key
sets; users staging weights by hand need to see at once *which* tensors are missing, extra or
the wrong shape, and which file they came from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint does not fit the model its config describes."""


def load_state_checked(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    optional: Callable[[str], bool] = lambda key: False,
    error: type[Exception] = CheckpointError,
) -> None:
    """Load ``state`` into ``model`` after checking every name and shape.

    Args:
        model: the freshly built model.
        state: tensors read from the checkpoint.
        source: the file named in the error.
        optional: keys the checkpoint may leave out (derived buffers, training statistics);
            the model keeps its freshly computed values for them.
        error: the exception type to raise (a module's own subclass, for its callers).

    Raises:
        error: listing shape mismatches, then missing, then unexpected tensors.
    """
    want = model.state_dict()
    missing = [k for k in want if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in want]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(want[k].shape)}"
        for k in want
        if k in state and tuple(state[k].shape) != tuple(want[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatch ({len(shapes)}): " + "; ".join(shapes[:3]))
        if missing:
            parts.append(f"missing ({len(missing)}): " + ", ".join(missing[:5]))
        if unexpected:
            parts.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected[:5]))
        raise error(f"{source} does not match its config: " + " | ".join(parts))
    # Names and shapes were checked above; strict=False only lets optional keys keep their values.
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()}, strict=False)
