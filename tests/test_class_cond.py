"""class_cond "add" (gpt.CLASS_COND): the class embedding added to every code's input, on every path.

The label must reach each code position the same way in teacher forcing (training, `nll`) and in cached decoding
(`sample`), for the three generators and both heads. Each test decodes through the cache - sampling, or replaying
given codes - and compares the per-step logits with one teacher-forced forward of the same model on the same codes
(with CFG: u + s (c - u) of two forwards, the null class in the second). A decoding path that forgot the label
(or added the wrong half's under CFG) gives other logits. A last check shows that "add" is more than the prefix:
with the class token's own contribution removed, the label still changes the logits.
"""
import pytest
import torch

from conftest import randomize_heads
from gpt import build_gpt, generate
from mergear import build_mergear, decode_mergear, rep_from_codes
from randar import build_randar, decode_randar

V, FV, C = 64, 2 ** 18, 10                        # plain vocabulary, factorized 2^18, classes


def add_model(kind, factorized, seed=0):
    torch.manual_seed(seed)
    args = dict(vocab_size=FV if factorized else V, factorized=factorized, num_classes=C, class_cond="add")
    if kind == "randar":
        model = build_randar("tiny", **args)
    elif kind == "mergear":
        model = build_mergear("tiny", merge_counts=(4, 8, 16), **args)
    else:
        model = build_gpt("tiny", **args)
    return randomize_heads(model).eval()


def unpack(logits):
    return logits if isinstance(logits, tuple) else (logits,)


@pytest.mark.parametrize("factorized", [False, True])
def test_llamagen_decoding_equals_teacher_forcing(factorized):
    model = add_model("llamagen", factorized)
    cond = torch.tensor([1, 7, 3])
    codes, logits = generate(model, cond, 16, generator=torch.Generator().manual_seed(0), return_logits=True)
    with torch.no_grad():
        out = model(codes, cond)
    ref = (out.logits_pre, out.logits_post) if factorized else (out.logits,)
    for got, want in zip(unpack(logits), ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_mergear_compact_replay_equals_the_masked_forward(cfg):
    model = add_model("mergear", False)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 5, (3, 16), generator=g)                      # few codes: many duplicates evicted
    cond, K = torch.tensor([0, 4, 9]), 8
    cached = decode_mergear(model, cond, K, 16, window=2, codes=codes, cfg_scale=cfg).logits   # (B, N, V)
    rep = rep_from_codes(codes)
    with torch.no_grad():
        c = model(codes, cond, K, rep, 2)
        u = model(codes, torch.full_like(cond, C), K, rep, 2)
    torch.testing.assert_close(cached, u + cfg * (c - u), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factorized", [False, True])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_randar_one_token_per_step_equals_teacher_forcing(factorized, cfg):
    """With one token per step (T = L) every query has seen only tokens, so the decoded logits are the teacher-
    forced ones exactly, with the linear CFG scale of each step."""
    model = add_model("randar", factorized)
    L = 16
    cond = torch.tensor([2, 9])
    cells = torch.arange(L).expand(2, L)                                  # every cell of the 4 x 4 grid
    d = decode_randar(model, cond, L, L, cfg_scale=cfg, cells=cells, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        c = unpack(model(d.tokens, cond, d.order, cells).logits)
        u = unpack(model(d.tokens, torch.full_like(cond, C), d.order, cells).logits)
    s = (1 + (cfg - 1) * torch.arange(L) / L)[None, :, None]              # linear CFG: tokens done / L
    for got, ci, ui in zip(unpack(d.logits), c, u):
        torch.testing.assert_close(got, ui + s * (ci - ui), rtol=1e-4, atol=1e-4)


def test_the_label_reaches_each_code_without_the_class_token():
    """Zero the class token's input (position 0) by hooking the first block: a prefix model's logits no longer
    depend on the label, an "add" model's still do."""
    codes = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(4))
    for class_cond, depends in [("prefix", False), ("add", True)]:
        torch.manual_seed(0)
        model = randomize_heads(build_gpt("tiny", vocab_size=V, num_classes=C, class_cond=class_cond)).eval()

        def zero_class_token(module, args):
            h = args[0].clone()
            h[:, 0] = 0
            return (h, *args[1:])

        hook = model.layers[0].register_forward_pre_hook(zero_class_token)
        with torch.no_grad():
            a = model(codes, torch.tensor([1, 1])).logits
            b = model(codes, torch.tensor([6, 6])).logits
        hook.remove()
        assert torch.allclose(a, b, atol=1e-6) != depends, class_cond


def test_unknown_class_cond_is_refused_in_one_line():
    with pytest.raises(ValueError, match="class_cond must be one of prefix, add"):
        build_gpt("tiny", vocab_size=V, num_classes=C, class_cond="adaln")
