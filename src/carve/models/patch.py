"""The one way carve replaces a module's forward: for the duration of a `with`, restored exactly.

Engines stand blocks in for others (a pass-through block, a checkpointed block, a head that
returns its input).  A module's forward may already be an instance attribute (accelerate's
dispatch and offload hooks wrap `module.forward` that way), so restoring means putting back the
instance attribute that was there, or removing ours when there was none: never deleting a hook,
never leaving a bound method behind."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

_ABSENT = object()
Forward = Callable[..., Any]


@contextmanager
def replaced_forwards(modules: Sequence[nn.Module], make: Callable[[nn.Module, Forward], Forward]) -> Iterator[None]:
    """Within, each module's forward is `make(module, forward it had)`; afterwards each module's
    instance-level forward is exactly what it was before."""
    saved = [m.__dict__.get("forward", _ABSENT) for m in modules]
    try:
        for m in modules:
            m.forward = make(m, m.forward)
        yield
    finally:
        for m, old in zip(modules, saved, strict=True):
            if old is _ABSENT:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old


def without_caches(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A block's call with every key/value cache withheld (None in its place).

    carve runs models with use_cache=False, but a few build a cache all the same and hand it to
    their blocks (XLM).  Whoever calls a block again with its recorded arguments (the layer-wise
    engine's replays, a checkpointed block's recompute) would append its keys to that cache a
    second time.  Within one forward a block's slot of the cache is empty when the block runs,
    so the block computes the same without it."""
    from transformers.cache_utils import Cache

    return (
        tuple(None if isinstance(a, Cache) else a for a in args),
        {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()},
    )
