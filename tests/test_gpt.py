"""gpt.py: the 2D RoPE invariants, cached decoding against the full causal forward, classifier-free guidance,
the factorized sub-tokens, sampling filters, LlamaGen's parameter counts and key layout, checkpoint loading, and a
tiny model that learns."""
import argparse
import math

import pytest
import torch

from gpt import (apply_rotary_emb, build_gpt, count_parameters, filter_logits, generate, load_llamagen,
                 precompute_freqs_cis_2d, sample_logits)
from lfq import join_index, split_index

from conftest import randomize_heads

V, C = 64, 10                                   # tiny vocabulary and number of classes
FV = 2 ** 10                                    # tiny factorized vocabulary: pre 6 bits (64), post 4 bits (16)

pytestmark = pytest.mark.usefixtures("one_thread")    # conftest.py: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    model = build_gpt("tiny", vocab_size=V, num_classes=C).eval()
    randomize_heads(model)
    return model


@pytest.fixture(scope="module")
def factorized():
    torch.manual_seed(1)
    model = build_gpt("tiny", vocab_size=FV, factorized=True, num_classes=C).eval()
    randomize_heads(model)
    return model


def cell(r, c, g):
    """Sequence position of grid cell (r, c): after the class token, raster order."""
    return 1 + r * g + c


# ----------------------------------------------------------------------------------------------------------------
# 2D RoPE
# ----------------------------------------------------------------------------------------------------------------


def test_rope_table_layout_is_llamagens():
    g, Dh = 4, 16
    table = precompute_freqs_cis_2d(g, Dh, base=10000, cls_token_num=1)
    assert table.shape == (1 + g * g, Dh // 2, 2)
    theta = [10000 ** (-2 * j / (Dh // 2)) for j in range(Dh // 4)]
    for r, c in [(0, 0), (1, 3), (3, 2)]:
        row = table[cell(r, c, g)]
        expect = [r * t for t in theta] + [c * t for t in theta]         # row half, then column half
        torch.testing.assert_close(row[:, 0], torch.tensor([math.cos(a) for a in expect]))
        torch.testing.assert_close(row[:, 1], torch.tensor([math.sin(a) for a in expect]))
    assert precompute_freqs_cis_2d(g, Dh, cls_token_num=3).shape == (3 + g * g, Dh // 2, 2)


def test_rope_preserves_norms():
    g, Dh = 4, 16
    table = precompute_freqs_cis_2d(g, Dh)[1:]                            # the grid cells
    x = torch.randn(2, g * g, 3, Dh)
    y = apply_rotary_emb(x, table)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(y[:, 1:], x[:, 1:])                        # it does rotate


def test_rope_rotates_each_pair_by_its_angle():
    """Closed form, one pair at a time: (a, b) -> (a cos - b sin, b cos + a sin), also with one table per sample
    (RandAR) and for bf16 input (computed in float32, returned in bf16)."""
    torch.manual_seed(0)
    B, T, H, Dh = 2, 3, 2, 8
    x = torch.randn(B, T, H, Dh)
    angle = torch.rand(B, T, Dh // 2) * 6.0                                 # per sample, position and pair
    table = torch.stack([angle.cos(), angle.sin()], -1)                     # (B, T, D_h/2, 2)
    want = torch.empty_like(x)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for j in range(Dh // 2):
                    a, c = x[b, t, h, 2 * j].item(), x[b, t, h, 2 * j + 1].item()
                    co, si = math.cos(angle[b, t, j].item()), math.sin(angle[b, t, j].item())
                    want[b, t, h, 2 * j], want[b, t, h, 2 * j + 1] = a * co - c * si, c * co + a * si
    torch.testing.assert_close(apply_rotary_emb(x, table), want)                        # per-sample tables
    torch.testing.assert_close(apply_rotary_emb(x[:1], table[0]), want[:1])             # one shared table
    got = apply_rotary_emb(x.bfloat16(), table)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def rotated_logit(q, k, m, n, table):
    """q.k after rotating q at sequence position m and k at n. q, k: (D_h,)."""
    qr = apply_rotary_emb(q.view(1, 1, 1, -1), table[m:m + 1])
    kr = apply_rotary_emb(k.view(1, 1, 1, -1), table[n:n + 1])
    return (qr * kr).sum().item()


def test_rope_logit_depends_only_on_the_2d_offset():
    g, Dh = 8, 16
    table = precompute_freqs_cis_2d(g, Dh)
    torch.manual_seed(0)
    q, k = torch.randn(Dh), torch.randn(Dh)
    same_a = rotated_logit(q, k, cell(1, 2, g), cell(0, 0, g), table)    # offset (1, 2)
    same_b = rotated_logit(q, k, cell(5, 6, g), cell(4, 4, g), table)    # offset (1, 2) elsewhere on the grid
    other = rotated_logit(q, k, cell(2, 1, g), cell(0, 0, g), table)     # offset (2, 1)
    assert same_a == pytest.approx(same_b, abs=1e-5)
    assert abs(same_a - other) > 1e-3
    # Raster distance 1 in both, but 2D offsets (0, 1) and (1, -7): a 1D RoPE over the raster index would tie them.
    right = rotated_logit(q, k, cell(3, 1, g), cell(3, 0, g), table)
    wrap = rotated_logit(q, k, cell(4, 0, g), cell(3, 7, g), table)
    assert abs(right - wrap) > 1e-3


def test_rope_class_rows_and_the_first_cell():
    g, Dh = 4, 16
    table = precompute_freqs_cis_2d(g, Dh, cls_token_num=1)
    x = torch.randn(2, 2, 3, Dh)
    y = apply_rotary_emb(x, table[:2])                                   # rows: class, cell (0, 0)
    # Cell (0, 0) has angle zero: cos 1, sin 0, the identity - q and k pass unchanged.
    torch.testing.assert_close(y[:, 1], x[:, 1])
    # The class row is LlamaGen's zeros (cos = sin = 0), not a zero angle: the class token's q and k become 0.
    assert torch.count_nonzero(table[0]) == 0
    assert torch.count_nonzero(y[:, 0]) == 0


# ----------------------------------------------------------------------------------------------------------------
# Teacher forcing and cached decoding
# ----------------------------------------------------------------------------------------------------------------


def test_forward_shapes_in_train_and_eval_mode(plain, factorized):
    """Both heads take the same input, all T codes (B, T), and give logits for all T."""
    idx, cond = torch.randint(0, V, (2, 16)), torch.randint(0, C, (2,))
    for mode in (True, False):
        plain.train(mode)
        assert plain(idx, cond).logits.shape == (2, 16, V)
    plain.eval()
    fidx = torch.randint(0, FV, (2, 16))
    for mode in (True, False):
        factorized.train(mode)
        out = factorized(fidx, cond)
        assert out.logits_pre.shape == (2, 16, 64) and out.logits_post.shape == (2, 16, 16)
    factorized.eval()


def test_the_last_code_is_read_only_where_it_is_predicted(plain, factorized):
    """Code T-1 is a target, not an input of the main stack: changing it moves no plain logit and no pre logit;
    only the factorized post logits of code T-1 move (post is predicted given its own pre sub-token)."""
    cond = torch.tensor([2, 5])
    idx = torch.randint(0, FV, (2, 16), generator=torch.Generator().manual_seed(0))
    other = idx.clone()
    other[:, -1] = (idx[:, -1] + 1) % 64                                 # another pre sub-token of the last code
    with torch.no_grad():
        assert torch.equal(plain(idx % V, cond).logits, plain(other % V, cond).logits)
        a, b = factorized(idx, cond), factorized(other, cond)
    assert torch.equal(a.logits_pre, b.logits_pre) and torch.equal(a.logits_post[:, :-1], b.logits_post[:, :-1])
    assert not torch.allclose(a.logits_post[:, -1], b.logits_post[:, -1])


def test_kv_cache_decoding_equals_the_full_causal_forward(plain):
    torch.manual_seed(0)
    B, T = 3, 16
    idx, cond = torch.randint(0, V, (B, T)), torch.randint(0, C, (B,))
    with torch.no_grad():
        full = plain(idx, cond).logits                                   # (B, T, V)
        plain.setup_caches(B, T)
        try:
            steps = [plain.logits(plain.step(None, cond, torch.tensor([0])))[:, -1]]
            for t in range(1, T):
                h = plain.step(idx[:, t - 1:t], None, torch.tensor([t]))
                steps.append(plain.logits(h)[:, -1])
        finally:
            plain.clear_caches()
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert all(layer.attention.kv_cache is None for layer in plain.layers)
    assert not any("cache" in k or "freqs" in k for k in plain.state_dict())


def test_a_cached_decoding_step_reads_nothing_back_from_the_device(plain, monkeypatch):
    """No int() / .item() / .tolist() of a tensor inside the layer stack of a decoding step: on a GPU each one waits
    for the device (it was int(input_pos.max()) in every layer of every step)."""
    reads = []
    for name in ("__int__", "item", "tolist", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: (reads.append(_name),
                                                                                          _real(self, *a))[1])
    cond, pos = torch.tensor([1, 2]), [torch.tensor([0]), torch.tensor([1]), torch.tensor([2])]
    with torch.no_grad():
        plain.setup_caches(2, 16)
        try:
            plain.step(None, cond, pos[0])
            plain.step(torch.tensor([[3], [4]]), None, pos[1])
            plain.step(torch.tensor([[5], [6]]), None, pos[2])
        finally:
            plain.clear_caches()
    assert reads == []


@pytest.mark.parametrize("kind", ["plain", "factorized", "mergear", "randar"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(kind):
    """--checkpoint-activations recomputes each block in backward: loss and every gradient equal the plain
    backward's, dropout on (its masks are replayed from the saved RNG state)."""
    from mergear import build_mergear, mergear_loss, rep_from_codes
    from randar import build_randar, randar_loss, random_orders
    vocab = FV if kind == "factorized" else V
    torch.manual_seed(0)
    if kind == "randar":
        model = build_randar("tiny", vocab_size=V, num_classes=C)
    elif kind == "mergear":
        model = build_mergear("tiny", vocab_size=V, num_classes=C, merge_counts=(4, 9))
    else:
        model = build_gpt("tiny", vocab_size=vocab, factorized=kind == "factorized", num_classes=C)
    randomize_heads(model)
    model.train()
    g = torch.Generator().manual_seed(1)
    codes, labels = torch.randint(0, vocab, (3, 16), generator=g), torch.randint(0, C, (3,), generator=g)
    order = random_orders(3, 16, g)

    def loss():
        if kind == "randar":
            return randar_loss(model, codes, labels, order)
        if kind == "mergear":
            return mergear_loss(model, codes, labels, torch.tensor([4, 9, 4]), rep_from_codes(codes))
        return model(codes, labels, targets=codes).loss

    results, kept = [], []
    for on in (False, True):
        model.checkpoint_activations = on
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)                                                     # the same dropout draws
        saved = []                                                               # what autograd keeps for backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            value = loss()
        kept.append(sum(saved))
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert kept[1] < kept[0]                                                     # the blocks' insides are not kept
    assert results[0][0].item() == results[1][0].item()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("which", ["plain", "factorized"])
def test_generate_logits_equal_teacher_forcing_on_its_samples(plain, factorized, which):
    model = plain if which == "plain" else factorized
    cond = torch.tensor([1, 7, 3])
    gen = torch.Generator().manual_seed(0)
    codes, logits = generate(model, cond, 16, temperature=1.0, generator=gen, return_logits=True)
    assert codes.shape == (3, 16) and codes.dtype == torch.int64 and not model.training
    with torch.no_grad():
        if which == "plain":
            torch.testing.assert_close(logits, model(codes, cond).logits, rtol=1e-4, atol=1e-5)
        else:
            out = model(codes, cond)
            torch.testing.assert_close(logits[0], out.logits_pre, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(logits[1], out.logits_post, rtol=1e-4, atol=1e-5)
            assert codes.max() < FV


@pytest.mark.parametrize("which", ["plain", "factorized"])
def test_generate_under_bf16_autocast(plain, factorized, which):
    """The GPU's decoding path, bf16 autocast: the KV cache takes the activations' dtype (a float32 cache refused
    the bf16 keys in index_put), and the logits of every step are the teacher-forced ones in float32 up to bf16's
    rounding."""
    model = plain if which == "plain" else factorized
    cond = torch.tensor([1, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.setup_caches(2, 16)
        cache_dtype = model.layers[0].attention.kv_cache.k.dtype
        model.clear_caches()
        codes, logits = generate(model, cond, 16, generator=torch.Generator().manual_seed(0), return_logits=True)
    assert cache_dtype == torch.bfloat16 and codes.shape == (2, 16)
    with torch.no_grad():
        out = model(codes, cond)
    pairs = [(logits, out.logits)] if which == "plain" else [(logits[0], out.logits_pre), (logits[1], out.logits_post)]
    for got, want in pairs:
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_cfg_scale_one_equals_the_conditional_logits(plain):
    cond = torch.tensor([2, 5])
    gen = torch.Generator().manual_seed(1)
    # A linear schedule with end scale 1 runs the [cond; null] batch with s = 1 at every step.
    codes, logits = generate(plain, cond, 16, cfg_scale=1.0, cfg_schedule="linear", generator=gen,
                             return_logits=True)
    with torch.no_grad():
        torch.testing.assert_close(logits, plain(codes, cond).logits, rtol=1e-4, atol=1e-5)


def test_cfg_combines_conditional_and_null_logits(plain):
    cond = torch.tensor([4, 9])
    null = torch.full_like(cond, C)
    s = 3.0
    codes, logits = generate(plain, cond, 16, cfg_scale=s, top_k=1, return_logits=True)
    with torch.no_grad():
        c, u = plain(codes, cond).logits, plain(codes, null).logits
    torch.testing.assert_close(logits, u + s * (c - u), rtol=1e-4, atol=1e-4)
    assert torch.equal(codes, logits.argmax(-1))
    # cfg interval 3: codes 0 .. 4 guided (LlamaGen's count of decode steps), the rest conditional only
    codes, logits = generate(plain, cond, 16, cfg_scale=s, cfg_interval=3, top_k=1, return_logits=True)
    with torch.no_grad():
        c, u = plain(codes, cond).logits, plain(codes, null).logits
    torch.testing.assert_close(logits[:, :5], (u + s * (c - u))[:, :5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[:, 5:], c[:, 5:], rtol=1e-4, atol=1e-5)


def test_factorized_cfg_guides_both_heads(factorized):
    cond = torch.tensor([4, 9])
    s = 2.5
    codes, (l_pre, l_post) = generate(factorized, cond, 16, cfg_scale=s, top_k=1, return_logits=True)
    with torch.no_grad():
        c, u = factorized(codes, cond), factorized(codes, torch.full_like(cond, C))
    torch.testing.assert_close(l_pre, u.logits_pre + s * (c.logits_pre - u.logits_pre), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l_post, u.logits_post + s * (c.logits_post - u.logits_post), rtol=1e-4, atol=1e-4)
    assert torch.equal(codes, join_index(l_pre.argmax(-1), l_post.argmax(-1), 6))   # pre, then post given pre


def test_linear_cfg_schedule():
    from gpt import cfg_scale_at
    assert [cfg_scale_at(t, 4, 3.0, "linear") for t in range(4)] == [1.0, 1.5, 2.0, 2.5]
    assert cfg_scale_at(2, 4, 3.0) == 3.0


def test_factorized_split_round_trips_the_18_bit_index(factorized):
    idx = torch.randint(0, 2 ** 18, (1000,))
    pre, post = split_index(idx, 6)
    assert pre.max() < 64 and post.max() < 4096 and torch.equal(join_index(pre, post, 6), idx)
    # The model embeds an index as pre_emb(low 6 bits) + post_emb(high bits), and its loss is the NLL of the code:
    # CE(pre) + CE(post) = -log p(pre) - log p(post | pre).
    codes, cond = torch.randint(0, FV, (2, 16)), torch.tensor([0, 1])
    e = factorized.embed_codes(codes)
    torch.testing.assert_close(e, factorized.pre_embeddings(codes % 64) + factorized.post_embeddings(codes // 64))
    with torch.no_grad():
        out = factorized(codes, cond, targets=codes)
    lp = out.logits_pre.log_softmax(-1).gather(-1, (codes % 64)[..., None])
    lq = out.logits_post.log_softmax(-1).gather(-1, (codes // 64)[..., None])
    assert out.loss.item() == pytest.approx(-(lp.mean() + lq.mean()).item(), rel=1e-5)


def test_post_slot_input_changes_no_weight_and_only_the_post_logits(factorized):
    """intra_post_input (gpt.py's INTRA_POST_INPUT) sets what the post slot starts from, not the weights: the release's
    slot ("pre") and ours (the default, "state+pre") take each other's state dict strictly, their pre logits (slot 0,
    which causal attention keeps from slot 1) agree, and their post logits differ. An unknown value is one error."""
    assert factorized.cfg.intra_post_input == "state+pre"
    release = build_gpt("tiny", vocab_size=FV, factorized=True, num_classes=C, intra_post_input="pre").eval()
    release.load_state_dict(factorized.state_dict(), strict=True)
    codes, cond = torch.randint(0, FV, (2, 16)), torch.tensor([3, 7])
    with torch.no_grad():
        ours, theirs = factorized(codes, cond), release(codes, cond)
    torch.testing.assert_close(ours.logits_pre, theirs.logits_pre)
    assert (ours.logits_post - theirs.logits_post).abs().max() > 1e-2
    with pytest.raises(ValueError, match="intra_post_input must be one of state\\+pre, pre, got 'both'"):
        build_gpt("tiny", vocab_size=FV, factorized=True, intra_post_input="both")


def test_top_k_one_is_greedy(plain):
    torch.manual_seed(0)
    logits = torch.randn(200, 50) * 3
    gen = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 2.0):
        assert torch.equal(sample_logits(logits, temperature, top_k=1, generator=gen), logits.argmax(-1))
    # A tiny nucleus keeps only the most likely token, too.
    assert torch.equal(sample_logits(logits, top_p=1e-6, generator=gen), logits.argmax(-1))
    # top-k 1 generation equals greedy decoding recomputed by teacher forcing
    cond = torch.tensor([3, 8])
    codes = generate(plain, cond, 16, top_k=1)
    with torch.no_grad():
        assert torch.equal(codes, plain(codes, cond).logits.argmax(-1))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    torch.manual_seed(0)
    logits = torch.randn(20, 30)
    for p in (0.3, 0.7, 0.95):
        kept = torch.isfinite(filter_logits(logits, top_p=p))
        probs = logits.softmax(-1)
        for b in range(20):
            order = probs[b].argsort(descending=True)
            n = int((probs[b][order].cumsum(0) < p).sum()) + 1          # tokens until the cumulative mass reaches p
            assert set(order[:n].tolist()) == set(kept[b].nonzero().flatten().tolist())
    kept = torch.isfinite(filter_logits(logits, top_k=5))
    assert (kept.sum(-1) == 5).all()


# ----------------------------------------------------------------------------------------------------------------
# LlamaGen's sizes and key layout
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,count", [("B", 110_888_448), ("L", 342_910_976), ("XL", 774_699_520)])
def test_parameter_counts_equal_llamagens(preset, count):
    with torch.device("meta"):
        model = build_gpt(preset, vocab_size=16384, num_classes=1000)
    assert count_parameters(model) == count


def test_factorized_gpt_l_parameter_count():
    with torch.device("meta"):
        model = build_gpt("L", factorized=True)
    n = count_parameters(model)
    print(f"factorized GPT-L (2^18 codes as 64 x 4096, 2 intra-token blocks): {n:,} parameters")
    # GPT-L - tok_embeddings - output + pre/post embeddings + 2 blocks + pre/post heads
    assert n == 342_910_976 - 2 * 16384 * 1024 + (64 + 4096) * 1024 * 2 + 2 * 12_847_104
    assert abs(n - 343.6e6) < 0.05e6


def llamagen_shapes(dim, n_layer, vocab=16384, classes=1000):
    """The key -> shape map of LlamaGen's c2i GPT state dict (FoundationVision/LlamaGen gpt.py)."""
    hidden = {768: 2048, 1024: 2816, 1280: 3584}[dim]
    shapes = {"cls_embedding.embedding_table.weight": (classes + 1, dim), "tok_embeddings.weight": (vocab, dim),
              "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(n_layer):
        p = f"layers.{i}."
        shapes.update({p + "attention.wqkv.weight": (3 * dim, dim), p + "attention.wo.weight": (dim, dim),
                       p + "feed_forward.w1.weight": (hidden, dim), p + "feed_forward.w3.weight": (hidden, dim),
                       p + "feed_forward.w2.weight": (dim, hidden), p + "attention_norm.weight": (dim,),
                       p + "ffn_norm.weight": (dim,)})
    return shapes


@pytest.mark.parametrize("preset,dim,n_layer", [("B", 768, 12), ("L", 1024, 24)])
def test_state_dict_has_llamagens_keys_and_shapes(preset, dim, n_layer):
    with torch.device("meta"):
        model = build_gpt(preset)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == llamagen_shapes(dim, n_layer)


def test_init_std_zero_plain_head_and_unit_norms():
    torch.manual_seed(0)
    model = build_gpt("tiny", vocab_size=256)
    assert torch.count_nonzero(model.output.weight) == 0
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.layers[0].attention.wqkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(model.norm.weight, torch.ones(64))
    f = build_gpt("tiny", vocab_size=FV, factorized=True)                 # zero factorized heads stall (gpt.py)
    for head in (f.output_pre, f.output_post):
        assert head.weight.std().item() == pytest.approx(0.02, rel=0.2)


# ----------------------------------------------------------------------------------------------------------------
# Loading LlamaGen checkpoints
# ----------------------------------------------------------------------------------------------------------------


def tiny(seed, **kw):
    torch.manual_seed(seed)
    return build_gpt("tiny", vocab_size=V, num_classes=C, **kw)


@pytest.mark.parametrize("layout", ["model", "module", "state_dict", "raw", "training"])
@pytest.mark.parametrize("from_file", [True, False])
def test_strict_loading_of_every_layout(tmp_path, layout, from_file):
    src = tiny(0)
    randomize_heads(src)
    sd = dict(src.state_dict())
    sd["freqs_cis"] = torch.zeros(17, 8, 2)                              # a stray RoPE table
    if layout == "raw":
        ckpt = sd
    elif layout == "training":                                           # LlamaGen's train_c2i.py checkpoint
        ckpt = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "steps": 100,
                "args": argparse.Namespace(gpt_model="GPT-B", image_size=256)}
    else:
        ckpt = {layout: sd}
    if from_file:
        path = tmp_path / "ckpt.pt"
        torch.save(ckpt, path)
        ckpt = str(path)
    dst = tiny(1)
    load_llamagen(dst, ckpt)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_loading_an_explicit_entry_and_prefixed_keys():
    src, dst = tiny(0), tiny(1)
    ddp = {"module." + k: v for k, v in src.state_dict().items()}        # a DDP wrapper's names
    load_llamagen(dst, {"model": tiny(2).state_dict(), "ema": ddp}, key="ema")
    assert torch.equal(dst.tok_embeddings.weight, src.tok_embeddings.weight)
    one_line_error(ValueError, lambda: load_llamagen(dst, {"model": ddp}, key="ema"), "no state dict under 'ema'")
    with pytest.raises(ValueError, match="factorized"):
        load_llamagen(build_gpt("tiny", vocab_size=FV, factorized=True), ddp)


def one_line_error(exc_type, fn, match):
    with pytest.raises(exc_type, match=match) as e:
        fn()
    assert "\n" not in str(e.value) and len(str(e.value)) < 400, str(e.value)


def test_loading_errors_are_one_line(tmp_path):
    model = tiny(0)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    one_line_error(FileNotFoundError, lambda: load_llamagen(model, tmp_path / "missing.pt"), "does not exist")
    one_line_error(ValueError, lambda: load_llamagen(model, empty), "empty")
    one_line_error(ValueError, lambda: load_llamagen(model, junk), "cannot be read|not a PyTorch file")
    # a state dict of another size: every mismatched shape is counted, one named
    other = tiny(0, dim=96, n_head=4).state_dict()
    path = tmp_path / "other.pt"
    torch.save({"model": other}, path)
    one_line_error(ValueError, lambda: load_llamagen(model, path), r"of other shape \(e\.g\. .*\(.*96\) vs")
    # missing and unexpected keys
    sd = dict(model.state_dict())
    sd.pop("norm.weight")
    sd["layers.9.attention.wo.weight"] = torch.zeros(64, 64)
    one_line_error(ValueError, lambda: load_llamagen(model, sd), "1 missing .*norm.weight.*1 unexpected")
    one_line_error(ValueError, lambda: load_llamagen(model, {"steps": 3, "args": "x"}), "holds no state dict")


# ----------------------------------------------------------------------------------------------------------------
# A tiny model learns
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["plain", "factorized"])
def test_tiny_model_loss_falls_on_fixed_codes(which):
    torch.manual_seed(0)
    vocab = 256 if which == "plain" else FV
    model = build_gpt("tiny", vocab_size=vocab, num_classes=C, factorized=which == "factorized")
    codes, labels = torch.randint(0, vocab, (8, 16)), torch.randint(0, C, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    losses = []
    for _ in range(30):
        out = model(codes, labels, targets=codes)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    # plain: the zero head gives uniform logits; factorized: N(0, 0.02) heads, logits within a few 0.01 of uniform
    assert losses[0] == pytest.approx(math.log(vocab), rel=1e-3 if which == "plain" else 1e-2)
    assert losses[-1] < 0.5 * losses[0], losses
