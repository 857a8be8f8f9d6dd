"""Shared test settings: small thread count so the suite behaves the same on 2-core CI machines, and what the
stage-2 tests (test_gpt, test_mergear, test_randar) share."""
import os
import sys

import pytest
import torch

# the top-level modules (merge.py, lfq.py, ...) are imported from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """The tiny GPTs run thousands of microsecond ops: on a loaded 2-core machine a second thread costs more in
    hand-offs than it saves (a training step 0.3 s instead of 5 ms). Restored after the module that asks for it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize_heads(model):
    """The GPT's heads start at zero (uniform logits); give them weights so that logits differ between positions."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("output"):
                p.normal_(0, 0.5)
    return model


def random_tokenizer_checkpoint(path, seed=0, **overrides):
    """A stage-1 checkpoint in train_stage1.py's format (model and EMA the same random weights) of the tiny G
    tokenizer, its config overridden by `overrides` (e.g. image_size=32, K=16); the stage-2 tests start from it.
    Returns the path."""
    import dataclasses

    from common import save_checkpoint
    from tokenizer import build_tokenizer, get_config
    cfg = get_config("g", "tiny", **overrides)
    torch.manual_seed(seed)
    sd = build_tokenizer("g", config=cfg).state_dict()
    save_checkpoint(str(path), {"model": sd, "ema": sd, "tokenizer_config": dataclasses.asdict(cfg), "step": 1})
    return str(path)


def assert_states_equal(a, b, where=""):
    """Nested checkpoint entries (state dicts, optimizer states, RNG states) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_states_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
