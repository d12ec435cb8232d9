"""Forward replacement restores each module exactly: an instance-level forward (accelerate's
hooks put one there) survives every engine that stands a module in for another."""

from __future__ import annotations

import torch

from carve.engines.gradient import checkpointed_blocks, next_token_loss
from carve.models.arch import find_blocks
from carve.models.patch import replaced_forwards
from tests.conftest import VOCAB, tiny_model


def _hooked(module: torch.nn.Module) -> object:
    """What accelerate does to a dispatched module: an instance forward wrapping the class's."""
    inner = module.forward

    def hooked(*args, **kwargs):  # type: ignore[no-untyped-def]
        return inner(*args, **kwargs)

    module.forward = hooked
    return hooked


def test_an_instance_forward_is_put_back_and_none_is_left_where_there_was_none() -> None:
    plain, hooked = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wrapper = _hooked(hooked)
    with replaced_forwards([plain, hooked], lambda _m, fwd: lambda x: fwd(x) * 0):
        assert plain(torch.ones(2)).abs().sum() == 0 and hooked(torch.ones(2)).abs().sum() == 0
    assert "forward" not in plain.__dict__ and hooked.__dict__["forward"] is wrapper
    try:
        with replaced_forwards([hooked], lambda _m, fwd: fwd):
            raise RuntimeError
    except RuntimeError:
        pass
    assert hooked.__dict__["forward"] is wrapper


def test_engines_keep_accelerate_style_hooks() -> None:
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    head = model.get_output_embeddings()
    wrappers = [_hooked(b) for b in blocks] + [_hooked(head)]
    ids = torch.randint(0, VOCAB, (1, 300), generator=torch.Generator().manual_seed(0))
    with checkpointed_blocks(model):
        next_token_loss(model, ids, chunk=128).backward()  # the chunked loss stands the head in
    assert [m.__dict__.get("forward") for m in [*blocks, head]] == wrappers
    assert not any("forward" in m.__dict__ for m in model.modules() if m not in [*blocks, head])
