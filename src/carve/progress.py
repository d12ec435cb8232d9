"""Progress bars: shown on stderr for any stage that runs longer than about 2 seconds."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence carve's bars and those transformers draws while loading and saving."""
    global _QUIET
    _QUIET = quiet
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is None:  # transformers reads huggingface_hub's switch when it is imported: a job that
        from huggingface_hub import utils as hub  # never loads a model does not pay for importing it

        if quiet:
            hub.disable_progress_bars()
        else:
            hub.enable_progress_bars()
    elif quiet:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kw: Any) -> Iterator[T]:
    yield from bar(desc, total, iterable, **kw)


def bar(desc: str, total: int | None, iterable: Iterable[Any] | None = None, **kw: Any) -> tqdm:
    """A bar by carve's rules, for work that is not one loop (advance it with `.update()`)."""
    return tqdm(iterable, desc=desc, total=total, disable=_QUIET, delay=2.0, leave=False, dynamic_ncols=True, **kw)


@contextmanager
def library_bars(module_name: str) -> Iterator[None]:
    """Route the plain tqdm bars a library module draws (transformers' GGUF de-quantization, which
    its own progress-bar switch does not reach) through carve's rules: hidden with --quiet, shown
    only after 2 s, cleared when done."""
    module = importlib.import_module(module_name)
    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return
    module.tqdm = functools.partial(original, disable=_QUIET, delay=2.0, leave=False)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.tqdm = original  # type: ignore[attr-defined]
