"""train_stage2.py: extract (shapes and an image folder, codes gathered through the source = the tokenizer's
recovered codes, labels, flips), the optimizer's decay groups, label smoothing against its closed form, the loss
falls on fixed codes, 2 processes == 1 process, exact resume, sample (PNG grid + ADM .npz whose labels name the
class generated), one-line errors. A random-init tiny tokenizer at 32 px (N = 64 tokens, K in {16, 25, 36}) keeps
every run small."""
import argparse
import dataclasses
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import train_stage2
from common import save_checkpoint
from data import ShapesDataset, tensor_to_uint8
from merge import recover
from mergear import build_mergear, rep_from_codes
from tokenizer import build_tokenizer, get_config, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_stage2.py")
IMAGES = 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A stage-1 checkpoint in train_stage1.py's format (random weights) and its codes (12 images, flipped too)."""
    d = tmp_path_factory.mktemp("stage2")
    cfg = get_config("g", "tiny", image_size=32, K=16, K_low=0, K_high=2,   # grid 8: N = 64, K 16 / 25 / 36,
                     z_channels=18)                                       # the factorized 2^18-code generators
    torch.manual_seed(0)
    sd = build_tokenizer("g", config=cfg).state_dict()
    tok = str(d / "stage1.pt")
    save_checkpoint(tok, {"model": sd, "ema": sd, "tokenizer_config": dataclasses.asdict(cfg), "step": 1})
    codes = str(d / "codes.pt")
    assert train_stage2.main(["extract", "--tokenizer", tok, "--num-images", str(IMAGES), "--flip",
                              "--batch-size", "5", "--amp", "none", "--out", codes]) == 0   # float32: the tests
    return d, tok, codes                                                  # compare with encode in float32


def train(d, name, codes, *extra, model="mergear"):
    out = str(d / name)
    assert train_stage2.main(["train", "--codes", codes, "--model", model, "--preset", "tiny", "--gpt", "tiny",
                              "--batch-size", "4", "--log-every", "1", "--out", out, *extra]) == 0
    return out


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out):
    return torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["model"]


def test_extract_gathers_the_recovered_codes(files):
    d, tok_path, codes = files
    table = torch.load(codes, weights_only=True)
    assert table["Ks"].tolist() == [16, 25, 36] and table["K_probs"].sum().item() == pytest.approx(1.0)
    M = 2 * IMAGES
    assert table["flips"].tolist() == [False, True] * IMAGES                  # row i * 2 + v, v = 1 mirrored
    assert table["image_index"].tolist() == [i // 2 for i in range(M)]
    assert table["labels"].tolist() == [(i // 2) % 10 for i in range(M)]      # ShapesDataset: label = index % 10
    tok = load_tokenizer(tok_path)
    x = torch.stack([ShapesDataset("train", size=32)[i][0] for i in range(IMAGES)])
    for K in (16, 36):
        assert table["indices"][K].shape == (M, K) and table["source"][K].shape == (M, 64)
        rows, Ks = torch.arange(M), torch.full((M,), K)
        recovered_codes, source = train_stage2.gather_codes(table, rows, Ks)   # [j] = indices[source[j]]
        for v, img in enumerate([x, x.flip(-1)]):
            with torch.no_grad():
                enc = tok.encode(img, K=K)
            assert torch.equal(source[v::2], enc.source)
            recovered = recover(enc.z_q, enc.source)                        # Eq. (11): (B, N, d)
            assert torch.equal(tok.quantizer.indices_to_codes(recovered_codes[v::2]), recovered)


def test_extract_reports_how_often_the_two_representative_readings_differ(files):
    """Brute force, position by position: the first position of j's group (source) vs of j's code (codes)."""
    table = torch.load(files[2], weights_only=True)
    for K in (16, 36):
        source = table["source"][K].long().tolist()
        codes = [[row[g] for g in src] for row, src in zip(table["indices"][K].tolist(), source)]   # recovered
        differ = [[seq_s.index(seq_s[j]) != seq_c.index(seq_c[j]) for j in range(len(seq_s))]
                  for seq_s, seq_c in zip(source, codes)]
        folded = [len(set(seq_s)) - len(set(seq_c)) for seq_s, seq_c in zip(source, codes)]
        expected = [sum(map(sum, differ)) / sum(map(len, differ)), sum(map(any, differ)) / len(differ),
                    sum(folded) / len(folded)]
        assert table["rep_disagreement"][K].tolist() == pytest.approx(expected)


def test_extract_reads_an_image_folder(files, tmp_path):
    """--data DIR reads DIR/train/<class>/<image> (classes sorted -> labels 0, 1, ...; files sorted), each image's
    shorter side resized to the tokenizer's 32 px and centre-cropped, rows i * 2 + v with --flip. The images written
    out by hand: a 32 x 32 image is read as it is, the centre crop of a 96 x 32 one is its middle third, a uniform
    64 x 48 image stays uniform."""
    _, tok_path, _ = files
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(32, 32, 3), (32, 96, 3), (32, 32, 3)]]
    layout = [("cat", "a.png", noise[0]), ("cat", "b.png", noise[1]),                  # label 0
              ("dog", "c.png", np.full((48, 64, 3), (200, 30, 90), np.uint8)), ("dog", "d.png", noise[2])]
    for cls, name, arr in layout:
        os.makedirs(tmp_path / "folder" / "train" / cls, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "folder" / "train" / cls / name)
    (tmp_path / "folder" / "train" / "dog" / "notes.txt").write_text("not an image")
    expected = [noise[0], noise[1][:, 32:64], np.full((32, 32, 3), (200, 30, 90), np.uint8), noise[2]]
    x = torch.tensor(np.stack(expected)).permute(0, 3, 1, 2).float() / 127.5 - 1            # (4, 3, 32, 32)
    out = str(tmp_path / "codes.pt")
    assert train_stage2.main(["extract", "--tokenizer", tok_path, "--data", str(tmp_path / "folder"), "--flip",
                              "--keep", "16", "--batch-size", "3", "--amp", "none", "--out", out]) == 0
    table = torch.load(out, weights_only=True)
    assert table["num_classes"] == 2 and table["num_images"] == 4 and table["Ks"].tolist() == [16]
    assert table["labels"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]                      # 4 images x (plain, mirrored)
    assert table["flips"].tolist() == [False, True] * 4 and table["image_index"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    tok = load_tokenizer(tok_path)
    assert table["indices"][16].shape == (8, 16) and table["source"][16].shape == (8, 64)
    for v, img in enumerate([x, x.flip(-1)]):
        with torch.no_grad():
            enc = tok.encode(img, K=16)
        assert torch.equal(table["indices"][16][v::2].long(), enc.indices), v
        assert torch.equal(table["source"][16][v::2].long(), enc.source), v



def test_extract_num_images_draws_every_class_of_an_image_folder(files, tmp_path):
    """--num-images n on a folder sorted by class: a seeded, class-balanced draw (the first n files would be the
    first class's only), the number of classes it holds printed and stored; each row's label is its file's class."""
    _, tok_path, _ = files
    rng = np.random.default_rng(1)
    for c in range(4):                                                           # 4 classes x 3 images
        os.makedirs(tmp_path / "folder" / f"class{c}")
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "folder" / f"class{c}" / f"{j}.png")
    files_of = sorted(str(p) for p in (tmp_path / "folder").glob("class*/*.png"))    # dataset order: class, name
    tables = {}
    for n, seed in [(4, 0), (6, 0), (6, 1), (6, 0)]:
        out = str(tmp_path / f"codes-{n}-{seed}.pt")
        assert train_stage2.main(["extract", "--tokenizer", tok_path, "--data", str(tmp_path / "folder"),
                                  "--num-images", str(n), "--seed", str(seed), "--keep", "16", "--out", out,
                                  "--overwrite"]) == 0                        # (6, 0) twice: the same file again
        table = torch.load(out, weights_only=True)
        labels, index = table["labels"].tolist(), table["image_index"].tolist()
        counts = [labels.count(c) for c in range(4)]
        assert len(labels) == n and len(set(index)) == n
        assert max(counts) - min(counts) <= 1 and table["classes_present"] == 4     # 1 each / 2, 2, 1, 1
        assert all(f"class{label}" in files_of[i] for label, i in zip(labels, index))
        tables.setdefault((n, seed), []).append(index)
    assert tables[(6, 0)][0] == tables[(6, 0)][1]                               # seeded: the same draw again
    assert tables[(6, 0)][0] != tables[(6, 1)][0]


def test_extract_runs_the_tokenizers_cnn_once_per_batch_for_all_counts(files):
    """encode_counts: the CNN (conv_in is its first layer) runs once for three K, and every K's codes equal a
    separate encode at that K."""
    _, tok_path, _ = files
    tok = load_tokenizer(tok_path)
    calls = []
    hook = tok.encoder.conv_in.register_forward_hook(lambda *_: calls.append(1))
    x = torch.stack([ShapesDataset("train", size=32)[i][0] for i in range(3)])
    with torch.no_grad():
        together = train_stage2.encode_counts(tok, x, [16, 25, 36])
        assert len(calls) == 1
        for K in (16, 25, 36):
            alone = tok.encode(x, K=K)
            assert torch.equal(together[K].indices, alone.indices) and torch.equal(together[K].source, alone.source)
    hook.remove()
    assert len(calls) == 4


def test_the_codes_table_is_memory_mapped(files):
    """read_codes maps the file (its pages are read when touched, shared by the ranks of a machine) instead of
    reading every tensor into this process: the file shows in this process's memory map while the table lives."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps")
    path = os.path.realpath(files[2])
    table = train_stage2.read_codes(path)
    with open("/proc/self/maps") as f:
        assert path in f.read()
    assert table["indices"][16][:2].shape == (2, 16)                            # rows read through the map

def test_optimizer_groups_decay_every_weight_but_the_norms(files):
    """Table A2 / LlamaGen: weight decay 0.05 on the linear layers and the embeddings (class, codes, Merge
    Instruction, RandAR's position instruction), none on the RMSNorm gains; every parameter in exactly one group,
    and these are the groups of the optimizer `train` builds."""
    _, _, codes = files
    for model in ("llamagen", "mergear", "randar"):
        args = train_stage2.build_parser().parse_args(["train", "--codes", codes, "--model", model, "--preset", "tiny",
                                                       "--gpt", "tiny", "--batch-size", "4"])
        run = train_stage2.setup(args, 0, 1, torch.device("cpu"))
        names = {id(p): n for n, p in run.model.named_parameters()}
        groups = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in run.opt.param_groups}
        assert set(groups) == {0.05, 0.0} and sum(map(len, groups.values())) == len(names), model
        no_decay = {n for n in names.values() if n == "norm.weight" or n.endswith(("attention_norm.weight",
                                                                                     "ffn_norm.weight"))}
        assert set(groups[0.0]) == no_decay and set(groups[0.05]) == set(names.values()) - no_decay, model
        assert {"cls_embedding.embedding_table.weight", "layers.0.attention.wqkv.weight"} <= set(groups[0.05])
        assert ("merge_embedding.weight" in groups[0.05]) == (model == "mergear")
        assert ("pos_instruct_embeddings" in groups[0.05]) == (model == "randar")


def smoothed_cross_entropy(logits, targets, eps):
    """Label smoothing written out: the target distribution is (1 - eps) on the target plus eps / V on every class,
    so the loss per position is (1 - eps) (-log p_y) + eps mean_v (-log p_v); averaged over positions."""
    logits = logits.double()
    log_p = logits - logits.exp().sum(-1, keepdim=True).log()                       # (..., V) log-softmax
    nll = -log_p.gather(-1, targets[..., None]).squeeze(-1)                         # (...,)
    return ((1 - eps) * nll + eps * -log_p.mean(-1)).mean()


@pytest.mark.parametrize("kind,factorized", [("llamagen", False), ("llamagen", True), ("mergear", True),
                                             ("randar", True)])
def test_label_smoothing_is_the_closed_form(kind, factorized):
    """Stage2Loss with label smoothing 0.1 (Table A2) equals the smoothed cross-entropy written out on the model's
    logits (factorized: that of the 6-bit pre sub-token plus that of the post sub-token), and differs from the
    unsmoothed loss."""
    from conftest import randomize_heads
    from gpt import build_gpt
    from randar import build_randar
    V, B, N = (2 ** 10 if factorized else 64), 3, 16
    torch.manual_seed(0)
    build = {"randar": build_randar, "mergear": build_mergear}.get(kind, build_gpt)
    extra = {"merge_counts": (4, 16)} if kind == "mergear" else {"position_head": True} if kind == "randar" else {}
    model = randomize_heads(build("tiny", vocab_size=V, factorized=factorized, num_classes=10, **extra).eval())
    codes, labels = torch.randint(0, V, (B, N)), torch.tensor([0, 3, 9])
    codes[:, 8:] = codes[:, :8]                                 # repeated codes: mergear's mask is not causal's
    K, order = torch.tensor([4, 16, 16]), torch.stack([torch.randperm(N) for _ in range(B)])
    targets = codes.gather(1, order) if kind == "randar" else codes                 # RandAR: generation order
    with torch.no_grad():
        cells = torch.arange(N).expand(B, N)                                       # RandAR: code j at cell j
        if kind == "randar":
            logits = model(codes, labels, order, cells).logits
        elif kind == "mergear":
            logits = model(codes, labels, K, rep_from_codes(codes))
        else:
            logits = model(codes, labels)[:2 if factorized else 1]
        loss = {eps: train_stage2.Stage2Loss(model, kind, rep="codes", label_smoothing=eps)(
            codes, labels, K, torch.empty(0), order, cells).item() for eps in (0.0, 0.1)}
        cell_nll = 0.0                                                  # RandAR: + the cells' NLL, never smoothed
        if kind == "randar":
            cell_logits = model(codes, labels, order, cells).cell_logits           # (B, N, N), used cells -inf
            cell_nll = -cell_logits.log_softmax(-1).gather(-1, order[..., None]).mean().item()
    parts = [(logits[0], targets % 64), (logits[1], targets // 64)] if factorized else [(logits[0], targets)]
    for eps in (0.0, 0.1):
        assert loss[eps] == pytest.approx(sum(smoothed_cross_entropy(l, t, eps).item() for l, t in parts) + cell_nll,
                                          rel=1e-5)
    assert abs(loss[0.1] - loss[0.0]) > 1e-3


@pytest.mark.parametrize("model", ["llamagen", "mergear", "randar"])
def test_loss_falls_on_fixed_codes(files, model):
    d, _, codes = files
    out = train(d, f"falls-{model}", codes, "--steps", "12", "--lr", "1e-2", "--warmup-steps", "0", "--dropout", "0",
                model=model)
    log = read_log(out)
    first, last = np.mean([r["loss"] for r in log[:3]]), np.mean([r["loss"] for r in log[-3:]])
    assert last < first - 1.0, (first, last)
    Ks = {r["K"] for r in log}
    assert Ks == {16.0} if model != "mergear" else len(Ks) > 1              # mergear draws K per image


@pytest.mark.parametrize("model", ["llamagen", "mergear", "randar"])
def test_bf16_autocast_step(files, model):
    """The GPU default (--amp bf16) on the CPU: two steps train, finite, and the weights stay fp32."""
    d, _, codes = files
    out = train(d, f"bf16-{model}", codes, "--steps", "2", "--amp", "bf16", model=model)
    assert all(np.isfinite(r["loss"]) for r in read_log(out))
    assert all(w.dtype == torch.float32 for w in weights(out).values() if w.is_floating_point())


@pytest.mark.parametrize("model", ["llamagen", "mergear", "randar"])
def test_resume_is_exact(files, model):
    """--stop-at + --resume equals the straight run bit for bit (dropout on: the RNG states are restored)."""
    d, _, codes = files
    straight = train(d, f"straight-{model}", codes, "--steps", "4", model=model)
    split = train(d, f"split-{model}", codes, "--steps", "4", "--stop-at", "2", model=model)
    train(d, f"split-{model}", codes, "--steps", "4", "--resume", os.path.join(split, "last.pt"), model=model)
    a, b = weights(straight), weights(split)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(split)]


@pytest.mark.parametrize("model", ["llamagen", "mergear", "randar"])
def test_gradient_accumulation_and_checkpointing_equal_the_plain_step(files, tmp_path, model):
    """The gradient of one train_step: --grad-accum 2 (two micro-batches of 2, the same K and orders) equals the
    batch of 4 in one piece, dropout off (its masks are drawn per micro-batch); --checkpoint-activations equals the
    plain backward with dropout on (the recomputed blocks replay the masks). Then both flags in a real run."""
    _, _, codes = files

    def gradient(run, accum, checkpointed, seed):
        run.grad_accum, run.model.checkpoint_activations = accum, checkpointed
        run.model.load_state_dict(start)
        torch.manual_seed(seed)
        calls = []
        hook = run.loss.register_forward_hook(lambda m, inputs, out: calls.append(len(inputs[0])))
        train_stage2.train_step(torch.tensor([3, 8, 13, 20]), 0, run, torch.device("cpu"))
        hook.remove()
        assert calls == [4 // accum] * accum                                    # the micro-batches
        return {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}

    for extra, pairs in [(["--dropout", "0", "--class-dropout", "0"], [((1, False), (2, False))]),
                         ([], [((1, False), (1, True))])]:
        args = train_stage2.build_parser().parse_args(["train", "--codes", codes, "--model", model, "--preset", "tiny",
                                                       "--gpt", "tiny", "--batch-size", "4", "--amp", "none",
                                                       "--out", str(tmp_path / "x"), *extra])   # equal in float32
        run = train_stage2.setup(args, 0, 1, torch.device("cpu"))
        run.model.train()
        start = {k: v.clone() for k, v in run.model.state_dict().items()}
        for one, other in pairs:
            g1, g2 = gradient(run, *one, seed=7), gradient(run, *other, seed=7)
            assert g1.keys() == g2.keys() and len(g1) > 0
            for name in g1:
                torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-6, msg=name)
    d = tmp_path / "run"
    train(d.parent, d.name, codes, "--steps", "2", "--gpt", "tiny", "--grad-accum", "2", "--checkpoint-activations",
          model=model)
    assert len(read_log(str(d))) == 2


def test_memory_estimate_is_printed_and_names_a_grad_accum_that_fits(files, tmp_path, monkeypatch, capsys):
    """The estimate is printed at start; when it exceeds the device's memory the run stops with one line naming
    the smallest --grad-accum whose micro-batches fit. GPT tiny MergeAR, 4 sequences of N + 1 = 65 positions: the
    estimate, written out, is weights 16 bytes per parameter + per sequence n_layer blocks x 65 x 100 bytes
    (float32) x width + 64 predicted positions x the head (plain: 5 bytes x 2^d codes; factorized: two intra-token
    blocks on two slots, 4 x 100 x width, + 10 bytes x (2^6 + 2^(d - 6)) logits) + the mask 65^2 x (1 + 2 n_layer)."""
    _, _, codes = files
    args = train_stage2.build_parser().parse_args(["train", "--codes", codes, "--model", "mergear", "--preset",
                                                   "tiny", "--gpt", "tiny", "--batch-size", "4", "--amp", "none",
                                                   "--out", str(tmp_path / "a")])          # the float32 estimate
    run = train_stage2.setup(args, 0, 1, torch.device("cpu"))
    c = run.model.cfg
    head = 4 * 100 * c.dim + 10 * (2 ** 6 + c.vocab_size // 2 ** 6) if c.factorized else 5 * c.vocab_size
    per_sequence = c.n_layer * 65 * 100 * c.dim + 64 * head + 65 ** 2 * (1 + 2 * c.n_layer)
    weights_bytes = 16 * sum(p.numel() for p in run.model.parameters())
    assert "memory estimate per process" in capsys.readouterr().out
    monkeypatch.setattr(train_stage2.common, "memory_available", lambda device: weights_bytes + 2.5 * per_sequence)
    args.run_anyway = False
    with pytest.raises(ValueError, match="--grad-accum 2 "):                    # 4 sequences: no; 2 fit
        train_stage2.check_memory(args, run, torch.device("cpu"))
    run.grad_accum = 2
    train_stage2.check_memory(args, run, torch.device("cpu"))                   # fits: no error

@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_equal_one_process(files):
    """A 2-process gloo run equals a 1-process run with the same global batch (MergeAR: K drawn per image of the
    global batch, so both runs give every image the same K). Dropout off: its masks are per-rank draws."""
    d, _, codes = files
    args = ["train", "--codes", codes, "--model", "mergear", "--preset", "tiny", "--gpt", "tiny", "--steps", "3",
            "--batch-size", "4", "--log-every", "1", "--dropout", "0", "--class-dropout", "0",
            "--amp", "none"]                                  # equal up to float32 reduction order (bf16: 1e-4 apart)
    two = str(d / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["torchrun", "--nproc_per_node=2", "--master_port=29561", SCRIPT, *args, "--out", two],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = str(d / "one")
    assert train_stage2.main([*args, "--out", one]) == 0
    for r1, r2 in zip(read_log(one), read_log(two), strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5) and r2["K"] == r1["K"]
    a, b = weights(one), weights(two)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=3e-5, msg=name)


@pytest.mark.parametrize("model", ["llamagen", "mergear", "randar"])
def test_sample_writes_a_png_and_an_adm_npz(files, model):
    """The grid holds the .npz images in order, 2 per row; `labels` names the class each image was generated for:
    greedy decoding (top-k 1) makes a raster model's sample a function of its class, so a class generated alone
    gives the images its label marks. (RandAR draws its orders from the batch's generator: sampled, not checked.)"""
    d, tok, codes = files
    out = train(d, f"sample-{model}", codes, "--steps", "1", model=model)
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    g = torch.Generator().manual_seed(0)
    for name, w in ckpt["model"].items():                   # heads near zero after one step: give them weights,
        if name.startswith("output"):                       # so that no greedy choice is a near-tie
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    path = str(d / f"sample-{model}.pt")
    save_checkpoint(path, ckpt)
    prefix = str(d / f"samples-{model}")
    steps = ["--num-steps", "5", "--top-k", "100"] if model == "randar" else ["--top-k", "1"]   # RandAR: 5 steps
    assert train_stage2.main(["sample", "--ckpt", path, "--num-per-class", "2", "--cfg", "1.5", "--out", prefix,
                              *steps]) == 0
    f = np.load(prefix + ".npz")
    assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (20, 32, 32, 3)
    grid = np.array(Image.open(prefix + ".png"))                            # 10 x 2 images, 2 white pixels apart
    margin = grid.shape[1] - (2 * 34 + 2)                                   # the class names, left of the rows
    assert grid.shape[0] == 10 * 34 + 2 and margin > 20
    assert (grid[:, :margin] < 128).any(axis=2).sum() > 50                  # dark text on white
    for i in range(20):
        y, x = 2 + (i // 2) * 34, margin + 2 + (i % 2) * 34
        assert np.array_equal(grid[y:y + 32, x:x + 32], f["arr_0"][i]), i
    if model == "randar":
        return
    gen, ckpt = train_stage2.load_generator(path, torch.device("cpu"))
    greedy = argparse.Namespace(cfg=1.5, cfg_schedule="constant", temperature=1.0, top_k=1, top_p=1.0)
    with torch.no_grad():                                                    # classes 3 and 8, one image each
        images = train_stage2.sample_images(model, gen, load_tokenizer(tok), torch.tensor([3, 8]), 16, greedy,
                                            ckpt["window"], torch.Generator().manual_seed(1))
    alone = dict(zip((3, 8), tensor_to_uint8(images).astype(int)))           # class -> (32, 32, 3)
    for c in (3, 8):
        marked = f["arr_0"][f["labels"] == c].astype(int)
        assert len(marked) == 2 and np.abs(marked - alone[c]).max() <= 1, c
    assert np.abs(alone[3] - alone[8]).max() > 10                            # the class changes the sample



def test_sample_streams_the_npz_and_caps_the_grid(files, monkeypatch):
    """The .npz is written batch by batch (batch 3 of 20 images) and holds them all; the PNG shows at most
    GRID_CLASSES classes evenly spread (here 3 of 10: classes 0, 4 and 9) with GRID_PER_CLASS images each (here 1,
    the first of its class), the .npz's own pixels."""
    d, _, codes = files
    out = train(d, "grid-llamagen", codes, "--steps", "1", "--gpt", "tiny", model="llamagen")
    monkeypatch.setattr(train_stage2, "GRID_CLASSES", 3)
    monkeypatch.setattr(train_stage2, "GRID_PER_CLASS", 1)
    prefix = str(d / "grid")
    assert train_stage2.main(["sample", "--ckpt", os.path.join(out, "last.pt"), "--num-per-class", "2",
                              "--batch-size", "3", "--out", prefix]) == 0
    f = np.load(prefix + ".npz")
    assert f["arr_0"].shape == (20, 32, 32, 3) and f["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    grid = np.array(Image.open(prefix + ".png"))
    margin = grid.shape[1] - (34 + 2)                                           # the class names
    assert grid.shape[0] == 3 * 34 + 2 and margin > 20                          # 3 rows of 1 image
    for row, c in enumerate([0, 4, 9]):
        assert np.array_equal(grid[2 + row * 34:2 + row * 34 + 32, margin + 2:margin + 34], f["arr_0"][2 * c]), c
    assert train_stage2.grid_classes(1000).tolist() == [round(i * 999 / 2) for i in range(3)]   # 0, 500 (499.5), 999

def test_bad_input_is_one_line(files, tmp_path, capsys):
    d, tok, codes = files
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    cases = [(["train", "--codes", str(tmp_path / "missing.pt"), "--model", "mergear"], "no such file"),
             (["train", "--codes", str(junk), "--model", "mergear", "--preset", "tiny"], "not a PyTorch file"),
             (["train", "--codes", tok, "--model", "mergear", "--preset", "tiny"], "lacks the entries"),
             (["train", "--codes", codes, "--model", "mergear", "--steps", "0"], "--steps must be at least 1"),
             (["extract", "--tokenizer", str(junk), "--out", str(tmp_path / "c.pt")], "not a PyTorch file"),
             (["sample", "--ckpt", codes], "lacks the entries"),
             (["sample", "--ckpt", str(tmp_path / "missing.pt")], "no such file"),
             (["nll", "--ckpt", codes, "--codes", codes], "lacks the entries"),
             (["nll", "--ckpt", codes, "--codes", str(tmp_path / "missing.pt")], "no such file")]
    for argv, message in cases:
        assert train_stage2.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    with pytest.raises(SystemExit) as e:                                    # argparse: usage + one error line
        train_stage2.main(["train", "--codes", codes, "--model", "pixelcnn"])
    assert e.value.code == 2 and "invalid choice: 'pixelcnn'" in capsys.readouterr().err


def test_plain_vocabulary_when_the_tokenizer_has_fewer_bits(tmp_path):
    """d = 10 LFQ bits: one 1024-way head (LlamaGen's layout) instead of the factorized 2^18 one; both models train
    and sample."""
    cfg = get_config("g", "tiny", image_size=32, K=16, K_low=0, K_high=1, z_channels=10)
    sd = build_tokenizer("g", config=cfg).state_dict()
    tok, codes = str(tmp_path / "stage1.pt"), str(tmp_path / "codes.pt")
    save_checkpoint(tok, {"model": sd, "ema": sd, "tokenizer_config": dataclasses.asdict(cfg), "step": 1})
    assert train_stage2.main(["extract", "--tokenizer", tok, "--num-images", "4", "--out", codes]) == 0
    for model in ("llamagen", "mergear"):
        out = train(tmp_path, model, codes, "--steps", "2", model=model)
        ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
        assert not ckpt["gpt_config"]["factorized"] and ckpt["model"]["output.weight"].shape == (1024, 64)
        assert train_stage2.main(["sample", "--ckpt", os.path.join(out, "last.pt"), "--num-per-class", "1",
                                  "--out", str(tmp_path / f"s-{model}")]) == 0
        assert np.load(tmp_path / f"s-{model}.npz")["arr_0"].shape == (10, 32, 32, 3)


def nats_per_code(out):
    """The figure of `nll`'s line "... | 12.4766 nats per code = ... | ... bits per image (...)"."""
    part = next(p for p in out.split("|") if "nats per code" in p)
    return float(part.split()[0])


def test_nll_on_held_out_codes(files, capsys):
    """extract --split val tokenizes the held-out images; `nll` of a generator whose heads are zero (set in its
    checkpoint: the factorized heads start N(0, 0.02)) is the uniform code, 18 ln 2 = 12.4766 nats, for all three
    models; a trained model scores its own training codes below that."""
    d, tok, _ = files
    val = str(d / "val.pt")
    assert train_stage2.main(["extract", "--tokenizer", tok, "--split", "val", "--num-images", "6", "--keep", "16",
                              "--amp", "none", "--out", val]) == 0          # float32, as the encode below
    table = torch.load(val, weights_only=True)
    assert table["split"] == "val" and table["labels"].tolist() == [i % 10 for i in range(6)]
    with torch.no_grad():
        enc = load_tokenizer(tok).encode(ShapesDataset("val", size=32)[4][0][None], K=16)
    assert torch.equal(table["indices"][16][4].long(), enc.indices[0])
    capsys.readouterr()
    for model in ("llamagen", "mergear", "randar"):
        out = train(d, f"nll-{model}", files[2], "--steps", "1", "--lr", "1e-30", model=model)
        ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
        for name in ("output_pre.weight", "output_post.weight"):            # zero heads: uniform pre and post
            ckpt["model"][name].zero_()
        save_checkpoint(os.path.join(out, "last.pt"), ckpt)
        assert train_stage2.main(["nll", "--ckpt", os.path.join(out, "last.pt"), "--codes", val]) == 0
        nats = nats_per_code(capsys.readouterr().out)
        assert nats == pytest.approx(18 * np.log(2), abs=1e-3), model
    out = train(d, "nll-trained", files[2], "--steps", "12", "--lr", "1e-2", "--dropout", "0", model="llamagen")
    assert train_stage2.main(["nll", "--ckpt", os.path.join(out, "last.pt"), "--codes", files[2], "--keep", "16"]) == 0
    captured = capsys.readouterr()
    assert nats_per_code(captured.out) < 18 * np.log(2) - 1.0
    assert "not held-out ones" in captured.err


def test_randar_trains_on_the_merged_tokens_in_random_orders(files):
    """RandAR's generator: block_size N (the grid its anchors lie on) and K = 16 merged tokens, the position
    instruction embedding and the position head, betas (0.9, 0.95) (Table A2's RandAR-L column); its loss is the
    NLL of the K (cell, token) pairs: about the uniform 18 ln 2 per token at step 0 (heads of N(0, 0.02) give logits
    of a few 0.01) plus the zero position head's uniform cell, ln(N - i) at step i, in orders that differ between
    steps and between images."""
    d, _, codes = files
    out = train(d, "randar-layout", codes, "--steps", "2", "--lr", "1e-30", model="randar")
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["gpt_config"]["block_size"] == 64 and ckpt["K"] == 16
    assert ckpt["train_config"]["betas"] in ([0.9, 0.95], (0.9, 0.95))
    assert ckpt["model"]["pos_instruct_embeddings"].shape == (1, 64)
    assert ckpt["model"]["position_output.weight"].shape == (64, 64)
    uniform_cells = sum(np.log(64 - i) for i in range(16)) / 16
    assert read_log(out)[0]["loss"] == pytest.approx(18 * np.log(2) + uniform_cells, abs=0.2)
    a = train_stage2.draw_orders(16, 0, 0, 4, 0, 1)
    b = train_stage2.draw_orders(16, 1, 0, 4, 0, 1)
    assert not torch.equal(a, b) and len({tuple(o) for o in a.tolist()}) == 4
    assert torch.equal(a.sort(1).values, torch.arange(16).expand(4, 16))    # permutations of the slots
    # rank r of w processes takes the global positions r, r + w, ... of the same draw
    assert torch.equal(train_stage2.draw_orders(16, 3, 0, 4, 1, 2), train_stage2.draw_orders(16, 3, 0, 4, 0, 1)[1::2])


def test_finetune_recovery_improves_accuracy_on_held_out_generator_tokens(files, capsys):
    """Appendix A.1: the Source Recovery Model fine-tuned on a RandAR generator's teacher-forced tokens of the
    training images places the generator's tokens of held-out images better than before; the written checkpoint
    is a stage-1 checkpoint whose only changed weights are the recovery model's."""
    d, tok, codes = files
    val = str(d / "val-ft.pt")
    assert train_stage2.main(["extract", "--tokenizer", tok, "--split", "val", "--num-images", "8", "--keep", "16",
                              "--out", val]) == 0
    gen = train(d, "randar-ft", codes, "--steps", "10", "--lr", "1e-2", "--dropout", "0", "--amp", "none",
                model="randar")                               # the generator these thresholds were measured with
    out = str(d / "tuned.pt")
    capsys.readouterr()
    assert train_stage2.main(["finetune-recovery", "--ckpt", os.path.join(gen, "last.pt"), "--codes", codes,
                              "--val-codes", val, "--steps", "40", "--batch-size", "8", "--lr", "3e-3",
                              "--mix-true", "0", "--out", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    acc = {w: float(next(x for x in lines if x.startswith(f"held-out recovery accuracy {w}")).split(":")[1].split()[0])
           for w in ("before", "after")}
    # before: the untrained model gets the 16 anchors' own cells right (given) and some of the rest by the rule that
    # a position belongs to a token anchored before it; the fine-tuning adds to that (here 0.40 -> 0.49)
    assert 0.25 <= acc["before"] < 0.45 and acc["after"] > acc["before"] + 0.05, acc
    old, new = torch.load(tok, weights_only=True), torch.load(out, weights_only=True)
    changed = {k for k in old["ema"] if not torch.equal(old["ema"][k], new["ema"][k])}
    assert changed and all(k.startswith("recovery.") for k in changed)
    assert load_tokenizer(out).recovery.pos_embed.shape == (1, 64, 64)      # loads as a tokenizer
    raster = train(d, "ft-mergear", codes, "--steps", "1", model="mergear")
    capsys.readouterr()
    assert train_stage2.main(["finetune-recovery", "--ckpt", os.path.join(raster, "last.pt"), "--codes", codes,
                              "--out", str(d / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fine-tuned with a RandAR generator" in err
