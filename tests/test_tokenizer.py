"""The MergeVQ tokenizer (tokenizer.py): shapes at several K, the source invariants, determinism, the paper
presets' parameter counts against Table A1, the DINOv2 weight selection, a bf16 step, and bad input."""
import math

import pytest
import torch

import losses
from merge import recover
from tokenizer import TABLE_A1, VARIANTS, build_tokenizer, count_parameters, get_config


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return {v: build_tokenizer(v, "tiny").eval() for v in VARIANTS}


def images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_decode_shapes_and_source_partition(tiny_models, variant):
    model = tiny_models[variant]
    N = model.cfg.num_tokens
    x = images(size=model.cfg.image_size)
    for K in sorted({model.cfg.K, N // 4, N}):
        with torch.no_grad():
            enc = model.encode(x, K=K)
            y = model.decode(enc.indices, enc.source)
        assert enc.indices.shape == (2, K) and enc.K == K
        assert enc.source.shape == (2, N) and enc.source.dtype == torch.int64 and enc.z_q.shape == (2, K, model.cfg.z_channels)
        assert y.shape == x.shape
        # The source partitions the N tokens into K non-empty groups: every merged token holds >= 1 token.
        for b in range(2):
            assert sorted(set(enc.source[b].tolist())) == list(range(K))
        # index -> code -> index round trip through the quantizer
        assert torch.equal(model.quantizer.indices_to_codes(enc.indices), enc.z_q)


@pytest.mark.parametrize("variant", VARIANTS)
def test_K_equal_N_is_identity_source(tiny_models, variant):
    model = tiny_models[variant]
    N = model.cfg.num_tokens
    with torch.no_grad():
        enc = model.encode(images(size=model.cfg.image_size), K=N)
    assert torch.equal(enc.source, torch.arange(N).expand(2, N))


def test_decoding_with_true_source_is_deterministic_and_uses_recovery(tiny_models):
    model = tiny_models["g"]
    x = images(size=model.cfg.image_size)
    with torch.no_grad():
        enc = model.encode(x, K=36)
        a = model.decode(enc.indices, enc.source)
        b = model.decode(enc.indices, enc.source)
        # decode_codes recovers exactly the N tokens of Eq. (11): the same as decoding the recovered grid directly
        full = recover(enc.z_q, enc.source)                                    # (B, N, d)
        g = model.cfg.grid
        c = model.decoder(full.transpose(1, 2).reshape(2, model.cfg.z_channels, g, g))
        recon = model(x, K=36).recon
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=1e-6)
    assert torch.allclose(recon, a, atol=1e-5)
    # every original token carries the code of the merged token that holds it
    for b in range(2):
        for j in range(0, model.cfg.num_tokens, 7):
            assert torch.equal(full[b, j], enc.z_q[b, enc.source[b, j]])


def test_kept_count_errors(tiny_models):
    model = tiny_models["g"]
    for bad in [0, -4, 65, 2.5, True]:
        with pytest.raises(ValueError, match="kept count K"):
            model.encode(images(size=32), K=bad)
    with pytest.raises(ValueError, match="not allowed"):
        model.check_K(2)                       # 64 tokens halve to at least 4 in 4 layers
    with pytest.raises(ValueError, match="expects images"):
        model.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="unknown variant"):
        build_tokenizer("gx", "tiny")
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("g", "huge")


def test_bf16_autocast_training_step():
    torch.manual_seed(0)
    model = build_tokenizer("g", "tiny")
    x = images(4, size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, K=49)
        lfq = out.enc.lfq
        loss = ((out.recon.float() - x).pow(2).mean() + lfq.commitment + lfq.per_sample_entropy
                - lfq.codebook_entropy + out.recovery_loss)
        pred = model.align(images(2, 28), K=49)
        loss = loss + pred.float().pow(2).mean() * 0
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0    # the straight-through path reaches the encoder


def test_tiny_tokenizer_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = build_tokenizer("gr", "tiny")
    x = torch.zeros(4, 3, 64, 64)
    x[:, 0, :32] = 0.8
    x[:, 2, :, 32:] = -0.6
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for step in range(25):
        out = model(x, K=36)
        loss = (out.recon - x).pow(2).mean()
        opt.zero_grad()
        (loss + 0.25 * out.enc.lfq.commitment + 0.5 * out.recovery_loss).backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("variant", VARIANTS)
def test_paper_parameter_counts_match_table_a1(variant):
    with torch.device("meta"):                    # builds the shapes only: no memory, no init
        model = build_tokenizer(variant)          # the default preset is the paper's
    enc, dec = count_parameters(model.encoder) / 1e6, count_parameters(model.decoder) / 1e6
    ref_enc, ref_dec = TABLE_A1[variant]
    assert abs(enc - ref_enc) / ref_enc < 0.02, (enc, ref_enc)
    assert abs(dec - ref_dec) / ref_dec < 0.02, (dec, ref_dec)
    assert model.cfg.image_size == 256 and model.cfg.enc_layers == 12 and model.cfg.z_channels == 18
    assert model.cfg.num_tokens == {"g": 1024, "gr": 256, "r": 256}[variant]
    assert model.cfg.K == {"g": 256, "gr": 144, "r": 36}[variant]
    assert 5e6 < count_parameters(model.recovery) < 8e6         # Table A2: about 7M at width 384


def test_dinov2_weight_selection_takes_evenly_spaced_elements():
    torch.manual_seed(0)
    teacher = losses.DINOv2(embed_dim=96, depth=4, num_heads=4, img_size=56)
    model = build_tokenizer("g", "tiny", embed_dim=64, ch=16, enc_heads=4)
    loaded = model.load_dinov2_selection(teacher.state_dict())
    assert "cls_token" in loaded and "blocks.0.attn.qkv.weight" in loaded
    assert not any(k.startswith(("conv_in", "down", "proj_out", "norm_out")) for k in loaded)
    t = teacher.state_dict()["blocks.1.mlp.fc1.weight"]                       # (384, 96) -> (256, 64)
    rows = torch.round(torch.linspace(0, 383, 256)).long()
    cols = torch.round(torch.linspace(0, 95, 64)).long()
    assert torch.equal(model.encoder.blocks[1].mlp.fc1.weight, t[rows][:, cols])
    assert torch.equal(model.encoder.blocks[3].ls2.gamma, teacher.blocks[3].ls2.gamma[cols])


def test_decode_with_predicted_source(tiny_models):
    """No source: the Source Recovery Model predicts one from the codes at their anchors, and decode uses it."""
    from merge import anchors
    model = tiny_models["r"]
    with torch.no_grad():
        enc = model.encode(images(), K=16)
        a = anchors(enc.source, 16)
        y = model.decode(enc.indices, None, a)                                 # source=None: predicted
        src = model.recovery.predict_source(enc.z_q, a)
        assert torch.equal(y, model.decode(enc.indices, src))
    assert y.shape == (2, 3, 64, 64)
    assert src.shape == (2, model.cfg.num_tokens) and 0 <= src.min() and src.max() < 16
    assert math.isfinite(y.abs().max().item())
    with pytest.raises(ValueError, match="anchors"):
        model.decode(enc.indices)
