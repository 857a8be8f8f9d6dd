"""Stage 2: class-conditional generators on MergeVQ tokens (paper Sec. 4, Appendix A.2, Table A2) and a diffusion
generator on MergeTok's continuous latents.

The subcommands, in the order a run uses them:

  extract  A stage-1 checkpoint (its EMA weights) tokenizes the training images once, into one file: for every
           image (and, with --flip, its mirror image) the K merged LFQ indices and the source map at several kept
           counts K - by default the tokenizer's candidate counts (its target K and the larger candidates of its
           KeptTokenSampler), so MergeAR training can draw K per image (Appendix A.3). A MergeTok tokenizer's file
           also holds its continuous latents at every K (MergeTokenizer.grid_latent: the merged posterior means
           recovered to the N grid with the source, the tensor its decoder path reads, (C, g, g) per row) and their
           per-channel mean and std, which scale them to unit variance for the DiT (--no-latents: left out).
  train    A GPT (gpt.py: LlamaGen's GPT, with the factorized 2^18-code head when the tokenizer has d = 18
           LFQ bits, the plain vocabulary otherwise) on those codes, raster order:
             --model llamagen  the plain causal model;
             --model mergear   MergeAR (Sec. 4.1): the Merge Instruction token of K and the Eq. (12) sparse mask
                               built from code equality (--rep codes, the mask decoding mirrors) or from the true
                               source (--rep source, the paper's training reading), window W = one grid row unless
                               --window; K drawn per image among the extracted counts with the tokenizer's
                               weights (Eq. (15) / (16)). The --rep default is measured in docs/stage2_cpu.md
                               ("MergeAR's mask in training"), the window in mergear.py's docstring.
           Both models see the same sequence: the N recovered codes, recovered[j] = indices[source[j]] (Eq. (11)),
           so the two are compared on the same tokens, as Table 3's "LlamaGen" and "MergeAR" rows are.
             --model randar    RandAR (Sec. 4.2, randar.py) on the K merged tokens of the target K, one random
                               order per image (drawn from (seed, step), like K); no source is modelled (the Source
                               Recovery Model predicts it). --tokens grid: RandAR over all N grid cells instead, each
                               holding its recovered code (Table 3's baseline row; no Source Recovery Model).
             --model dit       a DiT trained as a rectified flow (diffusion.py) on the normalised continuous
                               latents at the target K, with an EMA of its weights (the MergeTok abstract's "diffusion
                               generators"); DiT's recipe (DIT_TRAIN_PRESETS), --dit for its size.
  sample   Class-conditional samples of a trained generator, decoded by the tokenizer: a PNG grid (one row per
           class) and an ADM-format .npz (`arr_0` uint8 N x H x W x 3, `labels`) for `evaluate.py fid` or
           `evaluate.py shapes`. MergeAR decodes with its compacted KV cache at kept count K (--keep); RandAR decodes
           K tokens in --num-steps parallel steps (linear CFG), then the Source Recovery Model predicts the source.
           The DiT (EMA weights) integrates its flow in --num-steps Euler steps with guidance --cfg; the latent,
           unscaled, is decoded through the tokenizer's continuous path (MergeTokenizer.decode_grid_latent).
  nll      Held-out negative log-likelihood per code (codes of `extract --split val`); a DiT has none: its figure is
           the flow loss on held-out latents, with the labels and with the null class.
  finetune-recovery
           Appendix A.1's optional step: the Source Recovery Model fine-tuned on a RandAR generator's tokens of
           real images against their true source; writes a stage-1 checkpoint with the new recovery weights.

Optimisation (Table A2): AdamW, lr 1e-4, batch 1024, 300 epochs, betas (0.9, 0.99), label smoothing 0.1, weight
decay 0.05 on weights of dim >= 2 only, gradient clipping 1.0, bf16 autocast (common.default_amp). LlamaGen's code
differs in three places, each a flag: --betas 0.9 0.95, --label-smoothing 0, --lr-schedule constant. RandAR trains
with Table A2's RandAR-L column: betas (0.9, 0.95), the rest as LlamaGen-L (RandAR's code: lr 4e-4, cosine, 50k
warm-up steps: --lr 4e-4 --lr-schedule cosine).

    # the CPU demo: a tiny stage-1 checkpoint, its codes, a tiny generator of each kind, samples, the shapes score
    python train_stage1.py --variant g --preset tiny --out runs/stage1-g-tiny
    python train_stage2.py extract --tokenizer runs/stage1-g-tiny/last.pt --num-images 2000 --flip \\
        --out runs/codes-g-tiny.pt
    python train_stage2.py train --codes runs/codes-g-tiny.pt --model mergear --preset tiny
    python train_stage2.py train --codes runs/codes-g-tiny.pt --model llamagen --preset tiny
    python train_stage2.py train --codes runs/codes-g-tiny.pt --model randar --preset tiny
    python train_stage2.py sample --ckpt runs/stage2-mergear-tiny/last.pt --num-per-class 20
    python evaluate.py shapes runs/stage2-mergear-tiny/samples_0001500_cfg1_seed0_20perclass.npz
    python train_stage2.py finetune-recovery --ckpt runs/stage2-randar-tiny/last.pt --codes runs/codes-g-tiny.pt \\
        --out runs/stage1-g-tiny/recovery-finetuned.pt

    # the paper (Table A2): GPT-L on ImageNet codes of MergeVQ (G+R), 8 GPUs
    python train_stage2.py extract --tokenizer runs/stage1-gr-paper/last.pt --data /data/imagenet --flip \\
        --out codes-gr.pt
    torchrun --nproc_per_node=8 train_stage2.py train --codes codes-gr.pt --model mergear --gpt L
    torchrun --nproc_per_node=8 train_stage2.py train --codes codes-gr.pt --model llamagen --gpt L
    python train_stage2.py sample --ckpt runs/stage2-mergear-paper/last.pt --num-per-class 50
    python evaluate.py fid runs/stage2-mergear-paper/samples_*.npz VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights download

train: SIGTERM (a scheduler's preemption) or Ctrl-C stops the run at its next stop point (before each --grad-accum
micro-batch's forward, or at the end of a step; a step cut short is dropped), writes a checkpoint and exits 0 (the
workers do so under torchrun; torchrun itself, once signalled, exits 1 with a SignalException traceback); `--resume
<out>/last.pt` continues exactly (also after --stop-at). One job at a time writes a run folder (its run.lock); the
workers of a torchrun end when their launcher dies. A sample set is named by its settings, and no command writes
over an existing checkpoint, codes or sample file without --overwrite, or over a training run's files at all
(docs/runs.md).
"""
import argparse
import contextlib
import copy
import dataclasses
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import common
import data as data_lib
from resources import check_stage2 as check_memory                 # the memory estimate (resources.py)
from codes_table import (check_codes_fit, check_latents, check_tokenizer_identity, codes_hash, codes_identity,
                         gather_codes, latent_statistics, merged_codes, read_codes, scaled_latents, tokenizer_hash)
from diffusion import DIT_PRESETS, DiT, DiTConfig, build_dit, flow_loss
from diffusion import sample as sample_dit
from merge import KeptTokenSampler
from gpt import CLASS_COND, GPT_PRESETS, GPTConfig, Transformer, build_gpt, count_parameters, generate
from mergear import (MergeARTransformer, build_mergear, generate_mergear, merge_window, mergear_loss, rep_disagreement,
                     rep_from_codes, rep_from_source)
from randar import (RandARTransformer, build_randar, decode_with_recovery, generate_randar, randar_loss,
                    randar_losses, random_orders, teacher_forced_samples)
from tokenizer import load_tokenizer

MODELS = ("llamagen", "mergear", "randar", "dit")
RANDAR_STEPS = {256: 88, 144: 64}   # Table 3: RandAR's parallel steps for K = 256 (G) and 144 (G+R)
DIT_STEPS = 50                      # the DiT's Euler steps by default (diffusion.sample)

# ----------------------------------------------------------------------------------------------------------------
# Training configuration: Table A2 (paper) and a CPU preset (tiny)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    gpt: str = "L"                  # Table A2: GPT-L (24 blocks, width 1024, 16 heads)
    batch_size: int = 1024          # global batch, split over the processes
    epochs: int = 300               # passes over the images (with --flip each image is drawn once per epoch on average)
    steps: int = 0                  # > 0 overrides epochs
    lr: float = 1e-4
    betas: tuple = (0.9, 0.99)      # paper; LlamaGen's code: (0.9, 0.95)
    weight_decay: float = 0.05      # on weights of dim >= 2 only (LlamaGen's code)
    label_smoothing: float = 0.1    # paper; LlamaGen's code: 0
    grad_clip: float = 1.0
    lr_schedule: str = "step"       # x0.1 at lr_drops (as stage 1); LlamaGen's code: constant
    lr_drops: tuple = (0.9,)
    warmup_steps: int = 0
    dropout: float = 0.1            # token, residual and FFN dropout (LlamaGen's defaults)
    class_dropout: float = 0.1      # class label -> null class, for classifier-free guidance
    class_cond: str = "prefix"      # LlamaGen's class token only; "add": also added to every code (gpt.CLASS_COND)
    log_every: int = 50
    ckpt_every: int = 5000
    dit: str = "B/2"                # --model dit: the DiT's size (diffusion.DIT_PRESETS)
    ema_decay: float = 0.9999       # --model dit: the EMA it samples from (DiT's 0.9999, warmed up: common.ema_decay)


TRAIN_PRESETS = {
    "paper": TrainConfig(),
    # tiny: the CPU demo (experiments/stage2_cpu.py); the first two choices are measured in docs/stage2_cpu.md:
    # - class_cond "add": with LlamaGen's class token alone the label was ignored at this scale ("The class
    #   embedding added to every code");
    # - GPT tiny (width 64, 2 blocks), 1500 steps of batch 32 at lr 3e-3, no dropout: more steps or a wider model
    #   did not draw the shapes better ("How the scale was chosen");
    # - no label smoothing: with sampling over the whole vocabulary its uniform floor draws invalid codes; a short
    #   warm-up for the larger lr.
    "tiny": dataclasses.replace(TrainConfig(), gpt="tiny", batch_size=32, epochs=0, steps=1500, lr=3e-3,
                                warmup_steps=100, label_smoothing=0.0, dropout=0.0, class_cond="add",
                                log_every=50, ckpt_every=250),
}

# --model dit: DiT's training (facebookresearch/DiT train.py: AdamW lr 1e-4 without weight decay, global batch 256,
# a constant lr, EMA 0.9999, no clipping; 400K steps for its Table 4) on MergeTok's continuous latents, and a CPU
# preset (tiny) measured on MergeTok tiny's 8 x 8 x 18 latents (docs/mergetok.md, "Diffusion on the continuous
# latents").
DIT_TRAIN_PRESETS = {
    "paper": dataclasses.replace(TrainConfig(), dit="B/2", batch_size=256, epochs=0, steps=400_000, lr=1e-4,
                                 betas=(0.9, 0.999), weight_decay=0.0, label_smoothing=0.0, grad_clip=float("inf"),
                                 lr_schedule="constant", dropout=0.0, log_every=100, ckpt_every=50_000),
    "tiny": dataclasses.replace(TrainConfig(), dit="tiny", batch_size=64, epochs=0, steps=5000, lr=1e-3,
                                betas=(0.9, 0.999), weight_decay=0.0, label_smoothing=0.0, warmup_steps=100,
                                lr_schedule="step", dropout=0.0, ema_decay=0.999, log_every=50, ckpt_every=500),
}

# Fields a resumed run may change; every other one must equal the checkpoint's.
RESUMABLE_CHANGES = ("log_every", "ckpt_every")

# ----------------------------------------------------------------------------------------------------------------
# extract: tokenize the training images once
# ----------------------------------------------------------------------------------------------------------------

def extraction_dataset(data, size, split="train"):
    """The embedded shapes (the given split), or an ImageFolder read deterministically (resize + centre crop, no
    random crop or flip: the flip is ours, recorded): train: DIR/train if it exists, else DIR; val: DIR/val."""
    if data is None or data in data_lib.SHAPES_DATA:
        return data_lib.build_dataset(data, split=split, size=size)
    if split == "val":
        if not os.path.isdir(os.path.join(data, "val")):
            raise FileNotFoundError(f"--data {data} has no val/ folder: held-out codes need held-out images")
        return data_lib.ImageFolder(os.path.join(data, "val"), size=size, train=False)
    root = os.path.join(data, "train") if os.path.isdir(os.path.join(data, "train")) else data
    return data_lib.ImageFolder(root, size=size, train=False)


def kept_counts(tok_cfg, Ks=None):
    """The extracted counts K and the weights MergeAR training draws them with: the tokenizer's KeptTokenSampler
    candidates and weights (Appendix A.3, Eq. (15) / (16)), or the given counts Ks (--keep) with equal weights."""
    if Ks:
        Ks = sorted(set(Ks))
        return Ks, [1.0 / len(Ks)] * len(Ks)
    sampler = KeptTokenSampler(tok_cfg.K, tok_cfg.K_low, tok_cfg.K_high, kind=tok_cfg.K_sampling)
    return list(sampler.candidates), [float(p) for p in sampler.probs]


def extraction_subset(dataset, n, seed):
    """The dataset indices `extract --num-images n` tokenizes, in dataset order. All images when n is None; the
    first n of the embedded shapes (label = index % classes: any prefix is balanced); of an image folder, whose files
    are sorted by class (the first n would hold the first classes only), a class-balanced seeded draw: each class's
    files in a random order, the classes taking turns in a random order, so that n >= the number of classes
    covers every class that has images and no class gets more than one image above another (unless it runs out)."""
    if n is None or n >= len(dataset):
        return list(range(len(dataset)))
    if not hasattr(dataset, "samples"):                                     # the embedded shapes
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    by_class = {}
    for index, (_, label) in enumerate(dataset.samples):
        by_class.setdefault(label, []).append(index)
    shuffled = [[files[j] for j in torch.randperm(len(files), generator=g).tolist()]
                for _, files in sorted(by_class.items())]
    turns = [shuffled[j] for j in torch.randperm(len(shuffled), generator=g).tolist()]
    picked = []
    for r in range(max(map(len, turns))):
        picked += [files[r] for files in turns if r < len(files)][: n - len(picked)]
        if len(picked) == n:
            break
    return sorted(picked)


def encode_counts(tok, x, Ks):
    """One batch of images at every kept count K -> {K: the tokenizer's encoding}; the encoder's CNN (the same for
    every K) runs once."""
    with tok.encoder.features_computed_once(x):
        return {K: tok.encode(x, K=K) for K in Ks}


def wants_latents(args, tok):
    """Whether `extract` writes continuous latents: by default for a MergeTok tokenizer (its VAE branch), --latents
    asks for them (one line for a tokenizer without that branch), --no-latents leaves them out."""
    has = hasattr(tok, "grid_latent")                                       # mergetok.MergeTokenizer
    if args.latents and not has:
        raise ValueError(f"--latents: {args.tokenizer} is a {tok.cfg.variant} tokenizer, which has no continuous "
                         f"latents (only --variant mergetok has a VAE branch)")
    return has if args.latents is None else args.latents


def latent_entries(latents):
    """The codes file's continuous entries: per K the latents (M, C, g, g) and their per-channel mean and standard
    deviation (codes_table.latent_statistics), which scale them to zero mean and unit variance for the DiT."""
    stats = {K: latent_statistics(x) for K, x in latents.items()}
    return {"latents": latents, "latent_mean": {K: m for K, (m, _) in stats.items()},
            "latent_std": {K: sd for K, (_, sd) in stats.items()}}


def report_extract(args, out, t0):
    """The lines `extract` prints once the codes file is written."""
    Ks, M = out["Ks"].tolist(), len(out["labels"])
    size = sum(t.numel() * t.element_size() for d in (out["indices"], out["source"]) for t in d.values())
    print(f"wrote {args.out}: {M} rows ({out['num_images']} images; {out['classes_present']} of "
          f"{out['num_classes']} classes hold images), K {Ks}, {size / 2**20:.1f} MB of codes, "
          f"{time.time() - t0:.1f} s", flush=True)
    if out["classes_present"] < out["num_classes"]:
        print(f"extract: warning: {out['num_classes'] - out['classes_present']} classes have no image in these "
              f"codes (--num-images {args.num_images} is fewer than the classes, or their folders are empty)",
              file=sys.stderr, flush=True)
    for K in Ks:
        token_rate, sequence_rate, folded = out["rep_disagreement"][K].tolist()
        print(f"K={K}: MergeAR's representatives from code equality vs from the true source differ on "
              f"{token_rate:.1%} of positions ({sequence_rate:.0%} of sequences; {folded:.1f} of {K} groups share an "
              f"earlier group's code)", flush=True)
    for K, x in out.get("latents", {}).items():
        std, mean = out["latent_std"][K], out["latent_mean"][K]
        print(f"K={K}: continuous latents {tuple(x.shape[1:])} per row (the merged latents recovered to the N grid "
              f"with the source), per-channel std {std.min():.3g} .. {std.max():.3g}, |mean| up to "
              f"{mean.abs().max():.3g}", flush=True)


@torch.no_grad()
def run_extract(args):
    """Rows r = i * V + v: image i of the subset (extraction_subset), variant v (v = 1: mirrored). Per K: indices
    (M, K) int32, source (M, N) int16."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok, ckpt = load_tokenizer(args.tokenizer, ema=True, device=device, return_checkpoint=True)
    cfg = tok.cfg
    continuous = wants_latents(args, tok)
    Ks, probs = kept_counts(cfg, args.keep)
    Ks = [tok.check_K(K) for K in Ks]                                       # one line for an unreachable K
    dataset = extraction_dataset(args.data, cfg.image_size, args.split)
    subset = extraction_subset(dataset, args.num_images, args.seed)         # dataset indices, class-balanced
    n = len(subset)
    variants = [False, True] if args.flip else [False]
    V, M, N = len(variants), n * len(variants), cfg.num_tokens
    indices = {K: torch.empty(M, K, dtype=torch.int32) for K in Ks}        # LFQ indices < 2^d <= 2^31
    source = {K: torch.empty(M, N, dtype=torch.int16) for K in Ks}         # values < K <= N
    labels = torch.empty(M, dtype=torch.int64)
    latents = ({K: torch.empty(M, cfg.vae_channels, cfg.grid, cfg.grid) for K in Ks}   # float32, (M, C, g, g)
               if continuous else {})
    # MergeAR's two readings of the Eq. (12) representatives (--rep source / codes) differ wherever two merged
    # groups share a code: how often (docs/stage2_cpu.md), summed batch by batch (no pass over the whole table)
    disagreement = {K: torch.zeros(3, dtype=torch.float64) for K in Ks}
    amp = args.amp or common.default_amp(device)
    workers = common.loader_workers(args.workers, device)
    loader = DataLoader(torch.utils.data.Subset(dataset, subset), batch_size=args.batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    print(f"extract | {args.tokenizer} (step {ckpt.get('step')}, variant {cfg.variant}, N={N}, d={cfg.z_channels}) "
          f"| {args.split}: {n} images x {V} ({'with' if args.flip else 'no'} flip) | K {Ks} "
          f"{'+ continuous latents ' if continuous else ''}| {device}, amp {amp}, "
          f"{workers} loader worker(s)", flush=True)
    bar, start, t0 = common.progress_bar(n, desc="extract"), 0, time.time()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        i = torch.arange(start, start + len(x))                             # image numbers of this batch
        for v, flip in enumerate(variants):
            rows = i * V + v
            xv = x.flip(-1) if flip else x                                  # (B, 3, S, S), mirrored left-right
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                encodings = encode_counts(tok, xv, Ks)                      # K -> indices (B, K), source (B, N)
            for K, enc in encodings.items():
                indices[K][rows] = enc.indices.to(torch.int32).cpu()
                source[K][rows] = enc.source.to(torch.int16).cpu()
                if continuous:
                    latents[K][rows] = tok.grid_latent(enc).cpu()                # (B, C, g, g)
                recovered = enc.indices.gather(1, enc.source)               # Eq. (11) on indices: (B, N)
                disagreement[K] += torch.tensor(rep_disagreement(enc.source, recovered), dtype=torch.float64) * len(x)
            labels[rows] = y.long()
        start += len(x)
        bar.update(len(x))
        if not common.bar_is_live(bar) and (start // args.batch_size) % 20 == 0:
            print(f"extract: {start}/{n} images", flush=True)
    bar.close()
    out = {"indices": indices, "source": source, "Ks": torch.tensor(Ks), "K_probs": torch.tensor(probs),
           "rep_disagreement": {K: (s / M).float() for K, s in disagreement.items()},   # K -> (token, seq, folded)
           "labels": labels, "flips": torch.tensor(variants).repeat(n),                 # (M,) row i * V + v
           "image_index": torch.tensor(subset, dtype=torch.long).repeat_interleave(V),  # (M,) the dataset's index
           "num_classes": len(dataset.classes), "classes_present": int(labels.unique().numel()), "num_images": n,
           "tokenizer": os.path.abspath(args.tokenizer), "subset_seed": args.seed,
           "tokenizer_config": dataclasses.asdict(cfg), "tokenizer_step": ckpt.get("step"),
           "tokenizer_hash": tokenizer_hash(tok), "data": args.data or "embedded shapes", "split": args.split,
           **(latent_entries(latents) if continuous else {})}
    out["codes_hash"] = codes_hash(out)                                     # what a stage-2 resume compares
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    common.clear_stale_temporaries(args.out)
    common.save_checkpoint(args.out, out)
    report_extract(args, out, t0)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# train: the codes of a batch, the model, the loss
# ----------------------------------------------------------------------------------------------------------------


def draw_orders(L, step, seed, global_batch, rank, world):
    """RandAR's random generation orders, one permutation of the L slots per image of the global batch, from
    (seed, step) only, this rank's share taken as in `draw_K`: 1 and N processes and a resumed run agree."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 2 ** 40)    # a stream apart from draw_K's
    return random_orders(global_batch, L, g)[rank::world]                  # (local batch, L)


def draw_K(table_Ks, probs, step, seed, global_batch, rank, world):
    """One K per image of the global batch, from (seed, step) only: every rank draws the same list and takes the
    images it holds (the sampler gives rank r the global positions r, r + world, ...), so 1 and N processes and a
    resumed run draw the same K for the same image."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    pick = torch.multinomial(probs, global_batch, replacement=True, generator=g)   # (global_batch,)
    return table_Ks[pick][rank::world]                                      # (local batch,)


class Stage2Loss(nn.Module):
    """The training loss in one module call, so DistributedDataParallel sees every parameter.

    llamagen: teacher-forced cross-entropy of all N recovered codes, causal (the class token predicts code 0).
    mergear:  the same under the Eq. (12) mask of rep (from the true source or from code equality), with the
              Merge Instruction token of each sequence's K; duplicates are targets too (Fig. 6).
    randar:   codes (B, L) at cells (B, L) - the K merged indices at their anchors, or the N recovered codes at
              their own cells - and order (B, L) the generation order of each: the NLL of the (cell, token) pairs
              in that order (Sec. 4.2, Eq. (13), randar.py; the cells are predicted for merged tokens only).
    dit:      codes are normalised continuous latents (B, C, g, g): the rectified-flow loss (diffusion.flow_loss),
              its times, noise and label dropout from the global RNG (restored on resume)."""

    def __init__(self, model, kind, window=None, rep="codes", label_smoothing=0.0):
        super().__init__()
        self.model, self.kind, self.window, self.rep, self.ls = model, kind, window, rep, label_smoothing

    def forward(self, codes, labels, K, source, order=None, cells=None):
        m = self.model
        if self.kind == "dit":
            return flow_loss(m, codes, labels)
        if self.kind == "randar":
            return randar_loss(m, codes, labels, cells, order, label_smoothing=self.ls)
        if self.kind == "llamagen":
            return m(codes, labels, targets=codes, label_smoothing=self.ls).loss
        rep = rep_from_source(source) if self.rep == "source" else rep_from_codes(codes)   # (B, N)
        return mergear_loss(m, codes, labels, K, rep, self.window, self.ls)


def build_generator(kind, cfg, table, K=None, tokens="merged"):
    """The GPT for the codes: the tokenizer's vocabulary (factorized when d = 18) and block_size N, the grid (one
    Merge Instruction row per extracted K for MergeAR; RandAR on the merged tokens predicts their cells on it)."""
    if kind == "dit":
        return build_dit_generator(cfg, table, K)
    tok_cfg = table["tokenizer_config"]
    d, N = tok_cfg["z_channels"], table["source"][int(table["Ks"][0])].shape[1]
    common_args = dict(vocab_size=2 ** d, factorized=d == 18, num_classes=table["num_classes"],
                       token_dropout_p=cfg.dropout, resid_dropout_p=cfg.dropout, ffn_dropout_p=cfg.dropout,
                       class_dropout_prob=cfg.class_dropout, class_cond=cfg.class_cond)
    if kind == "randar":
        return build_randar(cfg.gpt, block_size=N, position_head=tokens == "merged", **common_args)
    if kind == "mergear":
        return build_mergear(cfg.gpt, block_size=N, merge_counts=table["Ks"].tolist(), **common_args)
    return build_gpt(cfg.gpt, block_size=N, **common_args)


def build_dit_generator(cfg, table, K):
    """The DiT for the table's continuous latents at K: their grid and channels, the table's classes."""
    C, g = table["latents"][K].shape[1:3]
    return build_dit(cfg.dit, input_size=g, in_channels=C, num_classes=table["num_classes"],
                     class_dropout_prob=cfg.class_dropout)


def optimizer_groups(model, weight_decay):
    """LlamaGen's split: weight decay on parameters of dim >= 2 (matrices, embeddings), none on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------------
# train: command line checks, setup, checkpoints
# ----------------------------------------------------------------------------------------------------------------


def build_train_config(args):
    cfg = (DIT_TRAIN_PRESETS if args.model == "dit" else TRAIN_PRESETS)[args.preset]
    overrides = {k: getattr(args, k) for k in ["gpt", "steps", "epochs", "batch_size", "lr", "label_smoothing",
                                               "lr_schedule", "warmup_steps", "dropout", "class_dropout", "class_cond",
                                               "log_every", "ckpt_every", "dit", "ema_decay"]
                 if getattr(args, k, None) is not None}
    if args.betas is not None:
        overrides["betas"] = tuple(args.betas)
    elif args.model == "randar":
        overrides["betas"] = (0.9, 0.95)                                    # Table A2's RandAR-L column
    if args.epochs is not None and args.steps is None:
        overrides["steps"] = 0                                              # --epochs counts, not the preset's steps
    return dataclasses.replace(cfg, **overrides)


def read_resume(path, args, cfg, codes, mmap=False):
    """A checkpoint to continue from: readable, written by `train` for this model with the same settings, on the same
    codes (codes: codes_identity of --codes) - one line naming the file or the field. mmap: its tensors are not read
    (check_args)."""
    ckpt = common.read_checkpoint(path, "checkpoint", required=["step", "rng", "train_config", "model_kind", "model",
                                                                 "opt"], mmap=mmap)
    if ckpt["model_kind"] != args.model:
        raise ValueError(f"{path} is a {ckpt['model_kind']} checkpoint, not {args.model}: use --model "
                         f"{ckpt['model_kind']}")
    saved = {k: v for k, v in ckpt["train_config"].items() if k not in RESUMABLE_CHANGES}
    now = {k: v for k, v in dataclasses.asdict(cfg).items() if k in saved}
    diff = common.config_mismatch({**saved, "rep": ckpt.get("rep"), "window": ckpt.get("window"),
                                   "keep": ckpt.get("keep"), "seed": ckpt.get("seed"),
                                   "tokens": tokens_choice(ckpt.get("tokens", "merged"))},
                                  {**now, "rep": args.rep, "window": args.window, "keep": args.keep,
                                   "seed": args.seed, "tokens": args.tokens})
    if diff:
        raise ValueError(f"resuming {path} with other training settings: {'; '.join(diff)} (saved -> now); a "
                         f"resumed run must use the checkpoint's settings")
    saved_codes = ckpt.get("codes_identity")                                # older checkpoints: not recorded
    if saved_codes:
        fields = ["tokenizer_hash", "split", "rows", "hash"] + ([] if saved_codes.get("tokenizer_hash") else
                                                                ["tokenizer"])
        diff = common.config_mismatch({k: saved_codes.get(k) for k in fields}, {k: codes.get(k) for k in fields})
        if diff:
            raise ValueError(f"resuming {path} with other codes than it trained on: {'; '.join(diff)} (saved -> "
                             f"--codes {args.codes}); pass the codes it trained on ({saved_codes['path']})")
    return ckpt


def resume(path, run, args):
    """Load model, optimizer and this rank's RNG states from a checkpoint of the same settings and codes; returns
    the step."""
    state, rank = run.state, run.rank
    ckpt = read_resume(path, args, run.cfg, run.codes_identity)
    common.load_entries(state, ckpt, path)
    rngs = ckpt["rng"]
    common.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    saved_world = ckpt.get("world_size", run.world)
    common.rank0_print(f"resumed from {path} at step {ckpt['step']}" + (
        "" if saved_world == run.world else
        f" (saved by {saved_world} process(es), continued by {run.world}: the rows, K and orders continue exactly; "
        f"the per-rank dropout streams and the reduction order are not those of an uninterrupted run)"))
    return ckpt["step"]


def snapshot(run, step, args):
    """Everything a resumed run and `sample` need; every rank takes part (the RNG states are gathered)."""
    return {**{name: obj.state_dict() for name, obj in run.state.items()}, "step": step,
            "model_kind": args.model, "tokens": args.tokens, "K": run.K,
            ("dit_config" if args.model == "dit" else "gpt_config"): dataclasses.asdict(run.model.cfg),
            **({"latent_mean": run.latent_mean, "latent_std": run.latent_std} if args.model == "dit" else {}),
            "train_config": dataclasses.asdict(run.cfg), "rep": args.rep, "window": args.window, "keep": args.keep,
            "seed": args.seed, "codes": os.path.abspath(args.codes), "codes_identity": run.codes_identity,
            "tokenizer": run.table["tokenizer"], "tokenizer_hash": run.table.get("tokenizer_hash"),
            "tokenizer_config": run.table["tokenizer_config"], "rng": common.all_gather_objects(common.rng_state()),
            "world_size": run.world}


def setup(args, rank, world, device):
    """Config, codes, model, optimizer, data order and (on --resume) the saved state, as one namespace `run`."""
    run = argparse.Namespace(rank=rank, world=world, seed=args.seed, kind=args.model, tokens=args.tokens)
    run.cfg = cfg = build_train_config(args)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    if device.type != "cuda" and args.model == "dit" and cfg.dit != "tiny" and not args.run_anyway:
        raise ValueError(f"no GPU: DiT-{cfg.dit} trains for days on GPUs. On a CPU: python train_stage2.py train "
                         f"--codes {args.codes} --model dit --preset tiny (--run-anyway starts it regardless)")
    if device.type != "cuda" and args.model != "dit" and cfg.gpt not in ("tiny", "small") and not args.run_anyway:
        raise ValueError(f"no GPU: GPT-{cfg.gpt} trains for days even on 8 GPUs. On a CPU: python train_stage2.py "
                         f"train --codes {args.codes} --model {args.model} --preset tiny (--run-anyway starts it "
                         f"regardless)")
    run.out_dir = train_out_dir(args)
    run.amp = args.amp or common.default_amp(device)
    run.autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if run.amp == "bf16"
                    else contextlib.nullcontext)

    run.table = table = read_codes(args.codes)
    run.codes_identity = codes_identity(table, args.codes)
    run.Ks, run.K_probs = table["Ks"], table["K_probs"].double()
    if args.keep is not None:                                               # one fixed K for every image
        if args.keep not in run.Ks.tolist():
            raise ValueError(f"--keep {args.keep}: the codes file holds K {run.Ks.tolist()} only")
        run.K_probs = (run.Ks == args.keep).double()
    elif args.model in ("llamagen", "randar", "dit"):                       # no M token: the tokenizer's target K
        run.K_probs = (run.Ks == table["tokenizer_config"]["K"]).double()
        if run.K_probs.sum() == 0:
            raise ValueError(f"the codes file lacks the tokenizer's target K={table['tokenizer_config']['K']}: "
                             f"pass --keep K among {run.Ks.tolist()}")
    run.K = int(run.Ks[run.K_probs.argmax()])                              # llamagen, randar: the one K trained on
    if args.model == "dit":
        check_latents(table, args.codes, run.K)                             # one line: no latents at K
    torch.manual_seed(args.seed)                                            # identical initial weights on every rank
    run.model = model = build_generator(args.model, cfg, table, run.K, args.tokens).to(device)
    model.checkpoint_activations = args.checkpoint_activations               # blocks recomputed in backward
    run.grad_accum = args.grad_accum
    if (cfg.batch_size // world) % run.grad_accum:
        raise ValueError(f"--grad-accum {run.grad_accum} must divide each process's batch ({cfg.batch_size} / "
                         f"{world} processes = {cfg.batch_size // world} sequences)")
    if args.model == "dit":                                                 # its EMA and latent statistics
        setup_dit(run, args)
    else:
        check_memory(args, run, device)                                     # every rank: all stop, or none
    torch.manual_seed(args.seed * world + rank)                             # per-rank dropout (DiT)
    run.loss = Stage2Loss(model, args.model, args.window, args.rep, cfg.label_smoothing)
    if world > 1:
        run.loss = DDP(run.loss, **(dict(device_ids=[device.index]) if device.type == "cuda" else {}))
    run.opt = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)

    run.rows = range(len(table["labels"]))                                 # row numbers; codes stay in the table
    if len(run.rows) < cfg.batch_size:
        raise ValueError(f"the codes file has {len(run.rows)} rows, fewer than one batch of {cfg.batch_size}")
    run.sampler = common.ResumableSampler(run.rows, world, rank, seed=args.seed)
    run.steps_per_epoch = len(run.rows) // cfg.batch_size                  # of the sampler: a pass over the rows
    images_per_epoch = int(table.get("num_images", len(run.rows)))         # the paper's epoch: a pass over images
    run.total = cfg.steps if cfg.steps > 0 else max(1, cfg.epochs * images_per_epoch // cfg.batch_size)
    run.state = {"model": model, "opt": run.opt, **({"ema": run.ema} if args.model == "dit" else {})}
    run.step = 0
    if args.resume:
        run.step = resume(args.resume, run, args)
    return run


def setup_dit(run, args):
    """--model dit: the statistics of the latents at the K trained on (the normalisation the checkpoint keeps for
    sampling) and the EMA copy of the DiT (DiT samples from its EMA)."""
    run.latent_mean, run.latent_std = run.table["latent_mean"][run.K], run.table["latent_std"][run.K]
    run.ema = copy.deepcopy(run.model).requires_grad_(False)


def dit_summary(args, run, device):
    """The one-line summary `train --model dit` prints."""
    c = run.model.cfg
    return (f"stage 2 | dit DiT-{run.cfg.dit} | {count_parameters(run.model) / 1e6:.2f}M parameters | latents "
            f"{c.in_channels} x {c.input_size} x {c.input_size} (K={run.K}), patch {c.patch_size}: "
            f"{(c.input_size // c.patch_size) ** 2} tokens | {len(run.rows)} rows | {run.world} process(es) on "
            f"{device} | global batch {run.cfg.batch_size} | {run.total} steps | EMA {run.cfg.ema_decay} | amp "
            f"{run.amp} | out {run.out_dir}")


def start_log(args, run, device):
    """Rank 0: the output folder, config.json, a one-line summary; stale temporaries of a killed save removed."""
    common.prepare_out_dir(run.out_dir, {"args": vars(args), "train": dataclasses.asdict(run.cfg),
                                         "gpt": dataclasses.asdict(run.model.cfg), "world_size": run.world},
                           replace=getattr(args, "overwrite_files", ()))
    if args.model == "dit":
        print(dit_summary(args, run, device), flush=True)
        return
    c = run.model.cfg
    Ks = [K for K, p in zip(run.Ks.tolist(), run.K_probs.tolist()) if p > 0]
    print(f"stage 2 | {args.model} GPT-{run.cfg.gpt} | {count_parameters(run.model) / 1e6:.2f}M parameters | "
          f"{'factorized 2^18' if c.factorized else f'vocab {c.vocab_size}'} | "
          + (f"K={run.K} merged tokens in random orders | " if args.model == "randar" and args.tokens == "merged"
             else f"N={c.block_size} recovered codes (K={run.K}) in random orders | " if args.model == "randar" else
             f"N={c.block_size} codes | K {Ks} | ")
          + f"{len(run.rows)} rows | {run.world} process(es) on {device} | global batch {run.cfg.batch_size} | "
          f"{run.total} steps | amp {run.amp} | out {run.out_dir}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# train: one step and the loop
# ----------------------------------------------------------------------------------------------------------------


def train_step(rows, step, run, device):
    """One optimizer step on the rows of this rank, in run.grad_accum micro-batches of equal size: the gradients of
    the micro-batches' mean losses, each divided by their number, add up to the gradient of the whole batch's mean
    loss (every sequence has the same number of positions), so --grad-accum changes memory, not the step. K and the
    orders are drawn for the whole batch. Returns the loss terms. A stop point (common.stop_point) before every
    micro-batch's forward: a stop request ends a long step after one micro-batch, not after all of them."""
    K = draw_K(run.Ks, run.K_probs, step, run.seed, run.cfg.batch_size, run.rank, run.world)   # (b,)
    labels, order, cells = run.table["labels"][rows], None, torch.empty(0)
    if run.kind == "randar" and run.tokens == "grid":                      # Table 3's baseline: the N grid cells
        codes, source = gather_codes(run.table, rows, K)                    # (b, N) each
        cells = torch.arange(codes.shape[1]).expand_as(codes)               # (b, N): code j at cell j
        order = draw_orders(codes.shape[1], step, run.seed, run.cfg.batch_size, run.rank, run.world).to(device)
    elif run.kind == "randar":
        (codes, cells), source = merged_codes(run.table, rows, run.K), torch.empty(0)   # (b, K) each: at anchors
    elif run.kind == "dit":                                                 # (b, C, g, g), zero mean, unit variance
        codes = scaled_latents(run.table, rows, run.K, run.latent_mean, run.latent_std)
        source = torch.empty(0)
        order = draw_orders(run.K, step, run.seed, run.cfg.batch_size, run.rank, run.world).to(device)   # (b, K)
    else:
        codes, source = gather_codes(run.table, rows, K)                    # (b, N) each
    codes, source, labels, K, cells = (t.to(device) for t in (codes, source, labels, K, cells))
    A, b = run.grad_accum, len(rows)
    run.opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for a in range(A):
        common.stop_point()                                                 # a stop asked: before this forward
        part = slice(a * b // A, (a + 1) * b // A)                          # this micro-batch's sequences
        last = a == A - 1                                                   # DDP averages the gradients once, here
        with contextlib.nullcontext() if last or not isinstance(run.loss, DDP) else run.loss.no_sync():
            with run.autocast():
                loss = run.loss(codes[part], labels[part], K[part], source[part],
                                None if order is None else order[part], cells[part] if cells.numel() else None)
            common.check_finite({"loss": loss.float()}, step)
            (loss / A).backward()
        loss_sum = loss_sum + loss.detach().float() / A
    terms = {"loss": loss_sum, "K": K.float().mean()}
    terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.opt.step()
    if run.kind == "dit":
        common.update_ema(run.ema, run.model, common.ema_decay(step, run.cfg.ema_decay))
    return terms


def train(args, rank, world, device):
    run = setup(args, rank, world, device)
    cfg, step = run.cfg, run.step
    stop_at = common.last_step(step, run.total, args.stop_at)                # before anything is written
    stopper = common.StopRequest(device)                                     # restored by run_distributed
    if rank == 0:
        start_log(args, run, device)
    ckpt_path, log_path = os.path.join(run.out_dir, "last.pt"), os.path.join(run.out_dir, "log.jsonl")
    bar = common.progress_bar(run.total, initial=step, desc=f"stage2-{args.model}")
    t_start, seqs_seen, stopped_by, saved, head, terms = time.time(), 0, None, step, None, {}
    log = common.TrainingLog(log_path, bar)
    run.model.train()
    while step < stop_at and stopped_by is None:
        # ---- one epoch of the sampler, starting where the data order is (exact on resume, also mid-epoch) ------
        epoch, in_epoch = divmod(step, run.steps_per_epoch)
        run.sampler.set_epoch(epoch)
        run.sampler.start = in_epoch * (cfg.batch_size // world)
        # (no DataLoader: a new loader iterator draws its base seed from the global RNG, which resume restores)
        local, b = list(run.sampler), cfg.batch_size // world               # this rank's rows, the rest of the epoch
        for rows in (torch.tensor(local[s:s + b]) for s in range(0, len(local) - b + 1, b)):
            lr = common.lr_at(step, run.total, cfg.lr, cfg.lr_schedule, cfg.lr_drops, cfg.warmup_steps)
            for group in run.opt.param_groups:
                group["lr"] = lr
            terms = stopper.step(train_step, rows, step, run, device)          # None: stopped inside, dropped
            if terms is not None:
                step += 1
                seqs_seen += cfg.batch_size
                log.add(terms)
                bar.update(1)
                head = {"step": step, "lr": lr}
            if terms is None or stopper.requested():
                stopped_by = stopper.signal
            last = step == stop_at or stopped_by is not None

            # ---- logging (all-reduced means) and checkpoints ------------------------------------------------------
            if step % cfg.log_every == 0 or last:
                log.write(head, {"seqs_per_s": round(seqs_seen / (time.time() - t_start), 2)})
            if (step % cfg.ckpt_every == 0 or last) and step != saved:
                payload = snapshot(run, step, args)
                if rank == 0:
                    common.save_checkpoint(ckpt_path, payload)
                saved = step
            if last:
                break
    bar.close()
    stopper.restore()
    if rank == 0:
        common.print_run_end(step, run.total, stopped_by, time.time() - t_start, seqs_seen, "sequences", ckpt_path,
                             interrupted=terms is None)


# ----------------------------------------------------------------------------------------------------------------
# sample: generate, decode, write a PNG grid and an ADM .npz
# ----------------------------------------------------------------------------------------------------------------


# GPTConfig fields added after checkpoints were written, with the value that gives those checkpoints' behaviour.
GPT_FIELDS_ADDED = {"intra_post_input": "pre", "position_head": False}


def load_generator(path, device):
    """The generator of a `train` checkpoint, in eval mode, and the checkpoint dict (a DiT: load_dit)."""
    ckpt = common.read_checkpoint(path, "generator checkpoint", required=("model", "model_kind", "tokenizer",
                                                                          "tokenizer_config"))
    if ckpt["model_kind"] == "dit":
        return load_dit(path, ckpt, device), ckpt
    if "gpt_config" not in ckpt:
        raise ValueError(f"generator checkpoint {path} lacks the entries gpt_config: not a file of this kind")
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["gpt_config"].items()}
    saved = {**{k: v for k, v in GPT_FIELDS_ADDED.items() if k not in saved}, **saved}
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    if set(saved) != fields:
        raise ValueError(f"generator checkpoint {path} was written by another version of gpt.py (config fields "
                         f"differ: {', '.join(sorted(set(saved) ^ fields))})")
    model = {"mergear": MergeARTransformer, "randar": RandARTransformer}.get(ckpt["model_kind"], Transformer)(
        GPTConfig(**saved))
    common.load_strict(model, ckpt["model"], f"generator checkpoint {path}")
    return model.to(device).eval(), ckpt


def load_dit(path, ckpt, device):
    """The DiT of a `train --model dit` checkpoint with its EMA weights (DiT samples from the EMA), in eval mode; the
    statistics its latents were normalised by ride along as latent_mean and latent_std (C,)."""
    missing = [k for k in ("ema", "dit_config", "latent_mean", "latent_std") if k not in ckpt]
    if missing:
        raise ValueError(f"generator checkpoint {path} lacks the entries {', '.join(missing)}: not a file of this kind")
    saved, fields = ckpt["dit_config"], {f.name for f in dataclasses.fields(DiTConfig)}
    if set(saved) != fields:
        raise ValueError(f"generator checkpoint {path} was written by another version of diffusion.py (config fields "
                         f"differ: {', '.join(sorted(set(saved) ^ fields))})")
    model = DiT(DiTConfig(**saved))
    common.load_strict(model, ckpt["ema"], f"generator checkpoint {path}, entry 'ema',")
    model = model.to(device).eval()
    model.latent_mean, model.latent_std = ckpt["latent_mean"].to(device), ckpt["latent_std"].to(device)
    return model


def randar_K(ckpt):
    """The K merged tokens a RandAR checkpoint generates: the K it trained on."""
    return int(ckpt.get("K") or ckpt.get("keep") or ckpt["tokenizer_config"]["K"])


def randar_length(ckpt):
    """The tokens a RandAR checkpoint generates: its K merged tokens, or (--tokens grid) the N grid cells."""
    return randar_K(ckpt) if ckpt.get("tokens", "merged") == "merged" else int(ckpt["gpt_config"]["block_size"])


def check_generator_fits(tok, model, kind, tok_path):
    """One line when the tokenizer is not the one the generator's codes came from."""
    c, N, d = model.cfg, tok.cfg.num_tokens, tok.cfg.z_channels
    if N != c.block_size or 2 ** d != c.vocab_size:
        raise ValueError(f"tokenizer {tok_path} (N={N}, 2^{d} codes) does not fit the generator (N={c.block_size}, "
                         f"{c.vocab_size} codes): pass the stage-1 checkpoint the codes were extracted with")


def sample_images(kind, model, tok, y, K, args, window, generator, tokens="merged"):
    """One batch of class labels y (B,) -> decoded images (B, 3, S, S) in [-1, 1].

    llamagen / mergear generate the N recovered codes in raster order and decode them position by position (the
    identity source). randar generates the K merged tokens in --num-steps parallel steps; the Source Recovery Model
    predicts their source from them and their generated anchors, Eq. (11) recovers N tokens, and the decoder runs
    (Sec. 4.2). randar over the grid (tokens="grid") generates the N recovered codes of the grid cells in random
    order and decodes them in place. dit integrates the flow from noise to a latent on the N grid in --num-steps Euler
    steps (diffusion.sample), unscales it and decodes it through the tokenizer's continuous path."""
    if kind == "dit":
        return dit_images(model, tok, y, args, generator)
    N = tok.cfg.num_tokens
    sampling = dict(cfg_scale=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, generator=generator)
    if kind == "randar" and tokens == "merged":
        indices, anchors = generate_randar(model, y, K, args.num_steps, **sampling)        # (B, K) each
        images, _ = decode_with_recovery(tok, indices, anchors)
        return images.float().clamp(-1, 1)
    if kind == "randar":
        cells = torch.arange(N, device=y.device).expand(len(y), N)                         # code j at cell j
        codes, _ = generate_randar(model, y, N, args.num_steps, cells=cells, **sampling)   # (B, N) cell order
    elif kind == "mergear":
        codes = generate_mergear(model, y, K, N, window, **sampling)                        # (B, N)
    else:
        codes = generate(model, y, N, **sampling)                                           # (B, N)
    identity = torch.arange(N, device=codes.device).expand(len(y), N)                       # the N codes, in place
    return tok.decode(codes, identity).float().clamp(-1, 1)                                 # (B, 3, S, S)


def dit_images(model, tok, y, args, generator):
    """DiT samples for labels y (B,) -> images (B, 3, S, S) in [-1, 1]: Euler with classifier-free guidance at scale
    --cfg, then x * std + mean (the training latents' statistics) and MergeTok's decode_grid_latent (W, decoder)."""
    x = sample_dit(model, y, num_steps=args.num_steps, cfg_scale=args.cfg, generator=generator)   # (B, C, g, g)
    x = x * model.latent_std[:, None, None] + model.latent_mean[:, None, None]
    return tok.decode_grid_latent(x).float().clamp(-1, 1)


def check_dit_fits(tok, model, tok_path):
    """One line when the tokenizer has no continuous path or its latent grid is not the DiT's."""
    c = model.cfg
    if not hasattr(tok, "decode_grid_latent"):
        raise ValueError(f"tokenizer {tok_path} is a {tok.cfg.variant} tokenizer without a continuous branch: a DiT "
                         f"decodes through a mergetok tokenizer's (pass the one its latents were extracted with)")
    if (tok.cfg.vae_channels, tok.cfg.grid) != (c.in_channels, c.input_size):
        raise ValueError(f"tokenizer {tok_path} writes latents of {tok.cfg.vae_channels} channels on a {tok.cfg.grid} "
                         f"x {tok.cfg.grid} grid, the DiT generates {c.in_channels} on {c.input_size} x "
                         f"{c.input_size}: pass the tokenizer its latents were extracted with")


def check_dit_sampling(args):
    """One line for a sampling setting a DiT does not have (it draws no tokens)."""
    given = ([f"--temperature {args.temperature:g}"] if args.temperature != 1 else []) + \
        ([f"--top-k {args.top_k}"] if args.top_k else []) + ([f"--top-p {args.top_p:g}"] if args.top_p != 1 else []) + \
        ([f"--keep {args.keep}"] if args.keep is not None else []) + \
        ([f"--cfg-schedule {args.cfg_schedule}"] if args.cfg_schedule not in (None, "constant") else [])
    if given:
        raise ValueError(f"{', '.join(given)}: not a setting of a DiT (it integrates a flow; its settings are --cfg "
                         f"and --num-steps, the Euler steps)")


def default_num_steps(L):
    """RandAR's parallel decoding steps for L tokens: Table 3's (88 for 256, 64 for 144), else about L / 3."""
    return RANDAR_STEPS.get(L, max(1, round(L * 88 / 256)))


def sample_out(args, ckpt):
    """The output path of `sample` without its extension: --out, or a name next to --ckpt that carries whatever
    makes two sample sets of one checkpoint differ, so that a second set never lands on the first:
    samples_<step>_cfg<scale>[_<schedule>]_seed<seed>[_temp<t>][_topk<k>][_topp<p>][_steps<T>][_K<K>]
    _<n>perclass[_tok-<tokenizer>], the bracketed parts where they differ from the defaults (RandAR: its steps
    always). An existing file is refused all the same (check_sample_out)."""
    if args.out:
        return args.out[:-4] if args.out.endswith((".npz", ".png")) else args.out
    kind = ckpt.get("model_kind")
    parts = [f"samples_{int(ckpt.get('step', 0)):07d}", f"cfg{args.cfg:g}"]
    if args.cfg_schedule and args.cfg_schedule != ("linear" if kind == "randar" else "constant"):
        parts.append(args.cfg_schedule)
    parts.append(f"seed{args.seed}")
    parts += [f"temp{args.temperature:g}"] if args.temperature != 1 else []
    parts += [f"topk{args.top_k}"] if args.top_k else []
    parts += [f"topp{args.top_p:g}"] if args.top_p != 1 else []
    if kind == "randar":
        parts.append(f"steps{args.num_steps or default_num_steps(randar_length(ckpt))}")
    elif kind == "dit":
        parts.append(f"steps{args.num_steps or DIT_STEPS}")
    parts += [f"K{args.keep}"] if args.keep is not None else []
    parts.append(f"{args.num_per_class}perclass")
    if args.tokenizer and not common.same_path(args.tokenizer, ckpt.get("tokenizer", "")):
        parts.append("tok-" + os.path.splitext(os.path.basename(args.tokenizer))[0])
    return os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "_".join(parts))


def check_sample_out(args, out, tok_path=None):
    """One line, before any sampling, when the .png or .npz cannot be written, would replace an input, a training
    run's file, or (without --overwrite) an existing sample set."""
    outputs = [("--out", out + ext) for ext in (".png", ".npz")]
    common.refuse_output_over_inputs(outputs, {"--ckpt": args.ckpt, "--tokenizer": tok_path or args.tokenizer})
    for name, path in outputs:
        common.check_output_file(path, name if args.out else "the sample file", args.overwrite)


@torch.no_grad()
def run_sample(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_generator(args.ckpt, device)
    kind, c = ckpt["model_kind"], model.cfg
    tok_path = args.tokenizer or ckpt["tokenizer"]
    check_sample_out(args, sample_out(args, ckpt), tok_path)
    class_dropout = ckpt.get("train_config", {}).get("class_dropout")
    if args.cfg != 1 and class_dropout == 0:
        raise ValueError(f"--cfg {args.cfg:g}: the generator trained with --class-dropout 0, so its null class (the "
                         f"unconditional half of guidance) never trained; sample with --cfg 1")
    if kind == "dit":
        check_dit_sampling(args)
        args.num_steps = args.num_steps or DIT_STEPS
    if args.cfg < 1:
        print(f"sample: note: --cfg {args.cfg:g} < 1 weakens the class toward the unconditional model"
              + (" (0: unconditional samples, the labels unused)" if args.cfg == 0 else ""), file=sys.stderr)
    tok = load_tokenizer(tok_path, ema=True, device=device)
    if kind == "dit":
        check_dit_fits(tok, model, tok_path)
    else:
        check_generator_fits(tok, model, kind, tok_path)
    check_tokenizer_identity(tok, tok_path, ckpt.get("tokenizer_hash"), ckpt["tokenizer"],
                             f"the generator {args.ckpt}'s codes")
    K = args.keep if args.keep is not None else tok.cfg.K
    if kind == "mergear" and K not in c.merge_counts:
        raise ValueError(f"--keep {K}: this MergeAR model knows K {list(c.merge_counts)}")
    tokens = ckpt.get("tokens", "merged")
    if kind == "randar":
        L = K = randar_length(ckpt)                                         # K merged tokens, or the N recovered codes
        if tokens == "merged" and args.keep is not None and args.keep != K:
            raise ValueError(f"--keep {args.keep}: this RandAR model generates K={K} merged tokens")
        args.num_steps = args.num_steps or default_num_steps(L)
        if not 1 <= args.num_steps <= L:
            raise ValueError(f"--num-steps must lie in [1, {'K' if tokens == 'merged' else 'N'}={L}], got "
                             f"{args.num_steps}")
    args.cfg_schedule = args.cfg_schedule or ("linear" if kind == "randar" else "constant")
    labels = torch.arange(c.num_classes).repeat_interleave(args.num_per_class)       # rows of the grid = classes
    g = torch.Generator(device).manual_seed(args.seed)
    print(f"sample | {kind} step {ckpt.get('step')} | {len(labels)} images ({args.num_per_class} per class) | cfg "
          f"{args.cfg} ({args.cfg_schedule}) temperature {args.temperature} top-k {args.top_k} top-p {args.top_p}"
          + (f" | N={K}" if kind == "randar" and tokens != "merged" else f" | K={K}" if kind != "llamagen" else "")
          + (f" in {args.num_steps} steps, source predicted" if kind == "randar" and tokens == "merged" else
             f" recovered codes in {args.num_steps} steps (no source to predict)" if kind == "randar" else
             f" | {args.num_steps} Euler steps from the EMA, decoded through the continuous branch" if kind == "dit"
             else "")
          + f" | tokenizer {tok_path}", flush=True)
    out, S = sample_out(args, ckpt), tok.cfg.image_size
    shown = grid_classes(c.num_classes)                                     # the grid: a few classes, a few each
    per_row = min(args.num_per_class, GRID_PER_CLASS)
    grid, bar, t0 = [], common.progress_bar(len(labels), desc="sample"), time.time()
    common.clear_stale_temporaries(out + ".npz")
    with data_lib.ImageNpzWriter(out + ".npz", len(labels), (S, S, 3)) as npz:   # ADM: N x H x W x 3, streamed
        for s in range(0, len(labels), args.batch_size):
            y = labels[s:s + args.batch_size].to(device)
            images = data_lib.tensor_to_uint8(sample_images(kind, model, tok, y, K, args, ckpt.get("window"), g,
                                                            tokens))      # (b, S, S, 3) uint8
            npz.write(images)
            index = torch.arange(s, s + len(y))                             # image i: class i // num_per_class
            keep = torch.isin(index // args.num_per_class, shown) & (index % args.num_per_class < per_row)
            grid.append(images[keep.numpy()])
            bar.update(len(y))
        npz.labels = labels.numpy()
    bar.close()
    grid = torch.from_numpy(np.concatenate(grid)).permute(0, 3, 1, 2).float() / 127.5 - 1   # exact back to uint8
    names = data_lib.CLASSES if c.num_classes == len(data_lib.CLASSES) else None     # the embedded shapes' classes
    data_lib.save_image_grid(grid, out + ".png", nrow=per_row,
                             row_labels=[names[k] if names else f"class {k}" for k in shown.tolist()])
    print(f"wrote {out}.npz ({len(labels)} images, {time.time() - t0:.1f} s, "
          f"{(time.time() - t0) / len(labels):.3f} s per image) and {out}.png (classes "
          f"{'all' if len(shown) == c.num_classes else shown.tolist()}, {per_row} per row)", flush=True)
    return 0


GRID_CLASSES, GRID_PER_CLASS = 16, 16       # the PNG of `sample`: at most 16 classes (rows) of 16 images


def grid_classes(num_classes):
    """The classes the sample grid shows: all, or GRID_CLASSES evenly spread over them (ImageNet's 1000 classes x
    50 samples would make a PNG of 1000 x 50 images)."""
    return torch.linspace(0, num_classes - 1, min(num_classes, GRID_CLASSES)).round().long().unique()


@torch.no_grad()
def run_nll(args):
    """Held-out negative log-likelihood per code of a trained generator, under its own training objective: the
    causal model (llamagen) or the Eq. (12) mask with the Merge Instruction token of K (mergear), every one of the N
    codes counted; randar: the K merged tokens, each sequence in one random order (seeded by --seed). No label
    smoothing, no dropout. With a factorized head the NLL of a code is CE(pre) + CE(post). Also printed per image
    (N codes for the raster models, K tokens for randar, whose source is left to the Source Recovery Model)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_generator(args.ckpt, device)
    table = read_codes(args.codes)
    kind, c = ckpt["model_kind"], model.cfg
    if kind == "dit":
        return dit_heldout_loss(args, model, ckpt, table)
    N = table["source"][int(table["Ks"][0])].shape[1]
    if N != c.block_size or 2 ** table["tokenizer_config"]["z_channels"] != c.vocab_size:
        raise ValueError(f"codes file {args.codes} (N={N}, 2^{table['tokenizer_config']['z_channels']} codes) does "
                         f"not fit the generator (N={c.block_size}, {c.vocab_size} codes)")
    if table["tokenizer_config"] != ckpt["tokenizer_config"] or table["tokenizer"] != ckpt["tokenizer"]:
        print(f"nll: warning: {args.codes} was extracted with {table['tokenizer']}, the generator was trained on "
              f"codes of {ckpt['tokenizer']}: the NLL means something only for the same tokenizer", file=sys.stderr)
    if table.get("split") != "val":
        print(f"nll: warning: {args.codes} holds {table.get('split', 'train')} images, not held-out ones "
              f"(extract with --split val)", file=sys.stderr)
    merged = kind == "randar" and ckpt.get("tokens", "merged") == "merged"   # RandAR on the K merged tokens
    if merged and args.keep is not None and args.keep != randar_K(ckpt):
        raise ValueError(f"--keep {args.keep}: this RandAR model generates K={randar_K(ckpt)} merged tokens")
    # default: the K the generator trained at (--keep of `train`, else its tokenizer's target K)
    K = args.keep if args.keep is not None else (ckpt.get("K") or ckpt.get("keep") or ckpt["tokenizer_config"]["K"])
    if K not in table["Ks"].tolist():
        raise ValueError(f"K={K}: the codes file holds K {table['Ks'].tolist()} only")
    if kind == "mergear" and K not in c.merge_counts:
        raise ValueError(f"--keep {K}: this MergeAR model knows K {list(c.merge_counts)}")
    rep = args.rep or ckpt.get("rep") or "codes"
    loss_fn = Stage2Loss(model, kind, ckpt.get("window"), rep)
    rows = torch.arange(len(table["labels"]) if args.max_rows is None else min(args.max_rows, len(table["labels"])))
    total, cell_total, bar = 0.0, 0.0, common.progress_bar(len(rows), desc="nll")
    g = torch.Generator().manual_seed(args.seed)
    for s in range(0, len(rows), args.batch_size):
        r = rows[s:s + args.batch_size]
        Kb, order, cells = torch.full((len(r),), K, dtype=torch.long), None, None
        labels = table["labels"][r].to(device)
        if kind == "randar":
            if merged:
                codes, cells = merged_codes(table, r, K)                    # (B, K) each: at their anchors
            else:
                codes, _ = gather_codes(table, r, Kb)                       # (B, N): code j at cell j
                cells = torch.arange(N).expand_as(codes)
            order = random_orders(len(r), codes.shape[1], g).to(device)     # (B, L)
            losses = randar_losses(model, codes.to(device), labels, cells.to(device), order)
            total, cell_total = total + losses.tokens.item() * len(r), cell_total + losses.cells.item() * len(r)
        else:
            codes, source = gather_codes(table, r, Kb)                      # (B, N) x 2
            total += loss_fn(codes.to(device), labels, Kb.to(device), source.to(device)).item() * len(r)
        bar.update(len(r))
    bar.close()
    nll, cell_nll = total / len(rows), cell_total / len(rows)
    print(f"nll | {kind} step {ckpt.get('step')} | {len(rows)} sequences of {table.get('split', 'train')} codes at "
          f"K={K}" + (f" (mask from {rep}, W={merge_window(model, ckpt.get('window'))})" if kind == "mergear" else "")
          + f" | {nll:.4f} nats per code = {nll / math.log(2):.3f} bits (uniform: {math.log2(c.vocab_size):.0f}) | "
          + (f"cells {cell_nll:.4f} nats per merged token (Eq. (13)) | " if merged else "")
          + f"{(nll + cell_nll) * (K if merged else N) / math.log(2):.0f} bits per image "
          f"({K if merged else N} codes{' and their cells' if merged else ''})", flush=True)
    return 0


@torch.no_grad()
def dit_heldout_loss(args, model, ckpt, table):
    """`nll` of a DiT: a flow model has no likelihood here, so its figure is the flow loss (diffusion.flow_loss, the
    velocity's mean squared error per element at logit-normal times) on held-out latents scaled by the training
    statistics, with the true labels and with the null class on the same times and noise (seeded by --seed): the
    gap is what the label tells the DiT. EMA weights, no label dropout."""
    K = int(ckpt["K"])
    check_latents(table, args.codes, K)
    C, g = table["latents"][K].shape[1:3]
    if (C, g) != (model.cfg.in_channels, model.cfg.input_size):
        raise ValueError(f"codes file {args.codes} holds latents {C} x {g} x {g}, the DiT generates "
                         f"{model.cfg.in_channels} x {model.cfg.input_size} x {model.cfg.input_size}")
    if table.get("tokenizer_hash") != ckpt.get("tokenizer_hash"):
        print(f"nll: warning: {args.codes} was extracted with {table['tokenizer']}, the DiT was trained on latents of "
              f"{ckpt['tokenizer']}: the loss means something only for the same tokenizer", file=sys.stderr)
    if table.get("split") != "val":
        print(f"nll: warning: {args.codes} holds {table.get('split', 'train')} images, not held-out ones "
              f"(extract with --split val)", file=sys.stderr)
    n = len(table["labels"]) if args.max_rows is None else min(args.max_rows, len(table["labels"]))
    device = model.latent_mean.device
    totals, g_cond, g_null = [0.0, 0.0], torch.Generator(device).manual_seed(args.seed), torch.Generator(device)
    for s in range(0, n, args.batch_size):
        r = torch.arange(s, min(s + args.batch_size, n))
        x = scaled_latents(table, r, K, ckpt["latent_mean"], ckpt["latent_std"]).to(device)   # (B, C, g, g)
        y = table["labels"][r].to(device)
        g_null.set_state(g_cond.get_state())                              # the same times and noise for both
        totals[0] += flow_loss(model, x, y, generator=g_cond).item() * len(r)
        totals[1] += flow_loss(model, x, torch.full_like(y, model.cfg.num_classes), generator=g_null).item() * len(r)
    cond, null = totals[0] / n, totals[1] / n
    print(f"nll | dit step {ckpt.get('step')} | {n} latents of {table.get('split', 'train')} images at K={K} | no "
          f"likelihood: held-out flow loss {cond:.4f} per element with the labels, {null:.4f} with the null class "
          f"(the label's share {null - cond:.4f})", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# finetune-recovery: the Source Recovery Model on the generator's own tokens (Appendix A.1, Table A2)
# ----------------------------------------------------------------------------------------------------------------
#
# Appendix A.1: "As for MergeVQ with Randomized AR generators, we further fine-tuned this module with the learned
# generator after stage-2 training", 5 epochs, optional (Table A2: AdamW (0.9, 0.95), weight decay 1e-2, batch
# 256). The target is not stated. Our reading: the inputs are tokens the generator writes for real images - at
# every slot a token drawn from its teacher-forced distribution given the true tokens before it in a random order
# (randar.teacher_forced_samples) - and the target is those images' true source. So the model learns to place
# tokens with the errors a generator makes, supervised where the truth is known. By default half of each batch
# keeps the tokenizer's own tokens (stage 1's data, --mix-true 0.5), so the model does not unlearn them: on the CPU
# demo (K = 64, 128 held-out images, 80 steps of batch 64, lr 1e-3) the accuracy on generator-made tokens went
# 0.155 -> 0.197 with generator tokens only, the tokenizer's own 0.42 -> 0.24; with half and half 0.155 -> 0.223 and
# 0.42 -> 0.36. Alternatives, not built: the generator's argmax instead of a sample (cleaner tokens, less like
# sampling: 0.206 -> 0.247); freely generated samples (no true source: only a self-consistency or reconstruction
# target).


@torch.no_grad()
def recovery_accuracy(tok, model, table, K, batch_size, device, seed, max_rows=None):
    """Fraction of original positions whose merged token the Source Recovery Model gets right, on the generator's
    teacher-forced tokens of the table's images (seeded) and on the tokenizer's own tokens: (generated, true)."""
    n = len(table["labels"]) if max_rows is None else min(max_rows, len(table["labels"]))
    g, hits = torch.Generator(device).manual_seed(seed), [0.0, 0.0]       # draws where the model samples
    for s in range(0, n, batch_size):
        r = torch.arange(s, min(s + batch_size, n))
        tokens, cells = (t.to(device) for t in merged_codes(table, r, K))  # (B, K) each: codes at their anchors
        labels, source = table["labels"][r].to(device), table["source"][K][r].long().to(device)   # (B,), (B, N)
        made = teacher_forced_samples(model, tokens, labels, cells, generator=g)   # (B, K) slot order
        for i, indices in enumerate((made, tokens)):
            z_q = tok.quantizer.indices_to_codes(indices)                   # (B, K, d)
            hits[i] += (tok.recovery.predict_source(z_q, cells) == source).float().sum().item()
    N = table["source"][K].shape[1]
    return hits[0] / (n * N), hits[1] / (n * N)


def run_finetune_recovery(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_generator(args.ckpt, device)
    if ckpt["model_kind"] != "randar":
        raise ValueError(f"{args.ckpt} is a {ckpt['model_kind']} checkpoint: the Source Recovery Model is fine-tuned "
                         f"with a RandAR generator (the raster models need no predicted source)")
    if ckpt.get("tokens", "merged") != "merged":
        raise ValueError(f"{args.ckpt} is RandAR over the grid's recovered codes (--tokens grid): it needs no "
                         f"predicted source; fine-tune the Source Recovery Model with a RandAR of the merged tokens")
    tok_path = args.tokenizer or ckpt["tokenizer"]
    common.refuse_output_over_inputs({"--out": args.out}, {"--tokenizer" if args.tokenizer else
                                                           "the generator's tokenizer": tok_path})
    tok, tok_ckpt = load_tokenizer(tok_path, ema=True, device=device, return_checkpoint=True)
    check_generator_fits(tok, model, "randar", tok_path)
    check_tokenizer_identity(tok, tok_path, ckpt.get("tokenizer_hash"), ckpt["tokenizer"],
                             f"the generator {args.ckpt}'s codes")
    K = randar_K(ckpt)
    table = read_codes(args.codes)
    val = read_codes(args.val_codes) if args.val_codes else None
    for name, path, t in (("--codes", args.codes, table), ("--val-codes", args.val_codes, val)):
        if t is not None:
            check_codes_fit(t, name, path, tok, tok_path)
            if K not in t["Ks"].tolist():
                raise ValueError(f"{name}: the codes file holds K {t['Ks'].tolist()}, not the generator's K={K}")
    rows = len(table["labels"])
    if args.batch_size > rows:
        raise ValueError(f"--batch-size {args.batch_size} is more than the {rows} rows of --codes {args.codes}")
    steps = args.steps or max(1, args.epochs * rows // args.batch_size)
    print(f"finetune-recovery | generator {args.ckpt} (randar, K={K}) | tokenizer {tok_path} | {rows} rows of "
          f"{args.codes} | {steps} steps of batch {args.batch_size} ({args.mix_true:.0%} the tokenizer's own tokens) "
          f"| lr {args.lr}", flush=True)
    if val is not None:
        before = recovery_accuracy(tok, model, val, K, args.batch_size, device, args.seed, args.max_val_rows)
        print(f"held-out recovery accuracy before: {before[0]:.4f} on generator-made tokens, {before[1]:.4f} on the "
              f"tokenizer's tokens", flush=True)
    rec = tok.recovery.train()
    opt = torch.optim.AdamW(rec.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=1e-2)   # Table A2
    g = torch.Generator(device).manual_seed(args.seed)                    # one stream for both draws, on the device
    order, bar, t0 = torch.empty(0, dtype=torch.long), common.progress_bar(steps, desc="finetune-recovery"), time.time()
    for step in range(steps):
        if len(order) < args.batch_size:                                    # a new pass over the rows
            order = torch.cat([order, torch.randperm(rows, generator=g, device=device).cpu()])
        r, order = order[:args.batch_size], order[args.batch_size:]
        tokens, cells = (t.to(device) for t in merged_codes(table, r, K))  # (B, K) each: codes at their anchors
        labels = table["labels"][r].to(device)                              # (B,)
        made = teacher_forced_samples(model, tokens, labels, cells, generator=g)   # (B, K): the generator's tokens
        keep = int(round(args.mix_true * len(r)))
        made[:keep] = tokens[:keep]                                         # the tokenizer's own, stage 1's data
        with torch.no_grad():
            z_q = tok.quantizer.indices_to_codes(made)                      # (B, K, d)
        loss = rec.loss(z_q, table["source"][K][r].long().to(device))       # Eq. (9) against the true source
        common.check_finite({"recovery": loss}, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        if not common.bar_is_live(bar) and ((step + 1) % args.log_every == 0 or step + 1 == steps):
            print(f"step {step + 1} recovery {loss.item():.4f}", flush=True)
    bar.close()
    rec.eval()
    if val is not None:
        after = recovery_accuracy(tok, model, val, K, args.batch_size, device, args.seed, args.max_val_rows)
        print(f"held-out recovery accuracy after:  {after[0]:.4f} on generator-made tokens, {after[1]:.4f} on the "
              f"tokenizer's tokens", flush=True)
    # A stage-1 checkpoint like the input, its Source Recovery weights (EMA and raw) replaced: load_tokenizer,
    # evaluate.py recon and `sample` read it as they read the original.
    tuned = {f"recovery.{k}": v.detach().cpu() for k, v in rec.state_dict().items()}
    out = dict(tok_ckpt)
    out["ema"], out["model"] = {**tok_ckpt["ema"], **tuned}, {**tok_ckpt["model"], **tuned}
    out["recovery_finetune"] = {"generator": os.path.abspath(args.ckpt), "codes": os.path.abspath(args.codes),
                                "steps": steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                                "mix_true": args.mix_true,
                                "from_tokenizer": os.path.abspath(tok_path)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    common.clear_stale_temporaries(args.out)
    common.save_checkpoint(args.out, out)
    print(f"wrote {args.out} ({steps} steps, {time.time() - t0:.1f} s): the tokenizer with its fine-tuned Source "
          f"Recovery Model", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def add_extract_args(sub):
    p = sub.add_parser("extract", help="tokenize the training images once (codes at several K, the source)")
    p.add_argument("--tokenizer", required=True, help="a stage-1 checkpoint of train_stage1.py (its EMA weights)")
    p.add_argument("--data", default=None, help="ImageFolder root (DIR/train if present); default: the embedded "
                                                "shapes (shapes, or shapes-rich: the tokenizer's)")
    p.add_argument("--out", required=True, help="the codes file to write (.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint or codes file at --out")
    p.add_argument("--keep", dest="keep", metavar="K", type=int, nargs="+", default=None,
                   help="the kept counts K to extract (default: the tokenizer's candidates, Appendix A.3)")
    p.add_argument("--flip", action="store_true", help="also extract every image mirrored (recorded in `flips`)")
    p.add_argument("--latents", action=argparse.BooleanOptionalAction, default=None,
                   help="also write the continuous latents on the N grid and their statistics, for --model dit "
                        "(default: for a mergetok tokenizer; --latents refuses any other, --no-latents skips them)")
    p.add_argument("--split", choices=["train", "val"], default="train",
                   help="the images to tokenize: training (default) or held-out ones (for `nll`)")
    p.add_argument("--num-images", type=int, default=None,
                   help="only N images: of an image folder a class-balanced draw (seeded by --seed), of the embedded "
                        "shapes the first N")
    p.add_argument("--seed", type=int, default=0, help="the draw of --num-images from an image folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", "--workers", type=int, default=None, dest="workers",
                   help="data-loader workers (default: 0 on the CPU, up to 8 with a GPU)")
    p.add_argument("--amp", choices=["bf16", "none"], default=None,
                   help="autocast of the tokenizer (default: bf16 on a GPU or on a CPU that computes bf16 "
                        "natively, else none)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_extract)


def tokens_choice(value):
    """--tokens, and the tokens a checkpoint records: "recovered" is the old spelling of "grid"."""
    return "grid" if value == "recovered" else value


def add_train_args(sub):
    p = sub.add_parser("train", help="train a generator on extracted codes (Table A2)")
    p.add_argument("--codes", required=True, help="the file `extract` wrote")
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--preset", default="paper", choices=list(TRAIN_PRESETS), help="schedule and model size")
    p.add_argument("--gpt", default=None, choices=list(GPT_PRESETS), help="GPT size (Table A2: L)")
    p.add_argument("--out", default=None, help="output folder (default runs/stage2-<model>-<preset>)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the images (Table A2: 300)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (Table A2: 1024)")
    p.add_argument("--lr", type=float, default=None, help="Table A2: 1e-4")
    p.add_argument("--betas", type=float, nargs=2, default=None, help="paper: 0.9 0.99; LlamaGen's code: 0.9 0.95")
    p.add_argument("--label-smoothing", type=float, default=None, help="paper: 0.1; LlamaGen's code: 0")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear lr warm-up over this many steps (paper: none stated; RandAR's code: 50000)")
    p.add_argument("--lr-schedule", choices=["step", "constant", "cosine"], default=None,
                   help="step (x0.1 at 90%%, default) or LlamaGen's constant")
    p.add_argument("--dropout", type=float, default=None, help="token / residual / FFN dropout (0.1)")
    p.add_argument("--class-dropout", type=float, default=None, help="class -> null class, for CFG (0.1)")
    p.add_argument("--class-cond", choices=CLASS_COND, default=None,
                   help="prefix: LlamaGen's class token (paper); add: also added to every code's input (the tiny "
                        "preset: the prefix alone is ignored at CPU scale, gpt.CLASS_COND)")
    p.add_argument("--keep", type=int, default=None, metavar="K",
                   help="train on one kept count K (default: mergear draws K per image, llamagen the target K)")
    p.add_argument("--rep", choices=["source", "codes"], default="codes",
                   help="mergear: the Eq. (12) mask from code equality (default: the mask decoding mirrors) or from "
                        "the true source (the paper's training reading)")
    p.add_argument("--window", type=int, default=None, help="mergear: the window W (default: one grid row)")
    p.add_argument("--tokens", type=tokens_choice, choices=["merged", "grid"], default="merged",
                   help="randar: the K merged tokens (Sec. 4.2, their source predicted by the Source Recovery Model), "
                        "or grid: Table 3's baseline, all N grid cells, each holding its recovered code (Eq. (11); "
                        "decoded in place). The old spelling of grid, recovered, is accepted")
    p.add_argument("--dit", default=None, choices=list(DIT_PRESETS),
                   help="--model dit: the DiT's size (the paper preset: B/2; tiny: the CPU's)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="--model dit: the EMA decay of the weights it samples from (DiT: 0.9999; tiny: 0.999)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out folder that holds one: that run's last.pt, config.json and "
                        "log.jsonl are deleted first, other files stay (without it such a folder is refused; a stage-1 "
                        "run, or a folder the codes or their tokenizer live in, is refused even with it)")
    p.add_argument("--stop-at", type=int, default=None, help="stop at this step with a checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--amp", choices=["bf16", "none"], default=None,
                   help="autocast (default: bf16 on a GPU or on a CPU that computes bf16 natively, else none)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="A",
                   help="split each process's batch into A micro-batches whose gradients add up before the step: the "
                        "same global batch (--batch-size) and optimizer steps, A times less activation memory")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each transformer block in backward instead of keeping its activations (about "
                        "a third more compute, a fraction of the memory)")
    p.add_argument("--deterministic", action="store_true",
                   help="GPU: deterministic kernels (cuBLAS workspace, cuDNN, torch.use_deterministic_algorithms; "
                        "torch warns for an op without one); slower. CPU runs are deterministic already")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--run-anyway", action="store_true",
                   help="start a large GPT even without a GPU, or past the memory estimate")
    p.set_defaults(func=None)


def add_sample_args(sub):
    p = sub.add_parser("sample", help="class-conditional samples -> PNG grid + ADM .npz")
    p.add_argument("--ckpt", required=True, help="a checkpoint of `train`")
    p.add_argument("--tokenizer", default=None, help="stage-1 checkpoint (default: the one stored in --ckpt)")
    p.add_argument("--out", default=None,
                   help="output path without extension (default: next to --ckpt, named by step, cfg, seed and the "
                        "other sampling settings that differ from the defaults)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sample set (.npz) at that path")
    p.add_argument("--num-per-class", type=int, default=50, help="samples per class (ImageNet FID: 50 x 1000)")
    p.add_argument("--cfg", type=float, default=1.0,
                   help="guidance scale (1 = none: Table 3's LlamaGen / MergeAR rows; LlamaGen's FID script 1.5)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], default=None,
                   help="default: linear for randar (RandAR's 1 -> --cfg), constant for the raster models")
    p.add_argument("--num-steps", type=int, default=None,
                   help="randar: parallel decoding steps T (Table 3: 88 for K = 256, 64 for K = 144; else about K/3)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--keep", type=int, default=None, metavar="K",
                   help="mergear: the kept count K of the Merge Instruction (default: the tokenizer's target K)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_sample)


def add_nll_args(sub):
    p = sub.add_parser("nll", help="held-out NLL per code of a trained generator (codes of `extract --split val`)")
    p.add_argument("--ckpt", required=True, help="a checkpoint of `train`")
    p.add_argument("--codes", required=True, help="codes of held-out images (`extract --split val`)")
    p.add_argument("--keep", type=int, default=None, metavar="K", help="the kept count K (default: the target K)")
    p.add_argument("--rep", choices=["source", "codes"], default=None,
                   help="mergear: the Eq. (12) mask from the source or from codes (default: as trained)")
    p.add_argument("--max-rows", type=int, default=None, help="only the first rows of the codes file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="randar: the random orders")
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_nll)


def add_finetune_recovery_args(sub):
    p = sub.add_parser("finetune-recovery", help="fine-tune the Source Recovery Model on a RandAR generator's "
                                                  "tokens of real images (Appendix A.1)")
    p.add_argument("--ckpt", required=True, help="a randar checkpoint of `train`")
    p.add_argument("--codes", required=True, help="codes of the training images (`extract`)")
    p.add_argument("--val-codes", default=None,
                   help="codes of held-out images (`extract --split val`): accuracy before and after")
    p.add_argument("--tokenizer", default=None, help="stage-1 checkpoint (default: the one stored in --ckpt)")
    p.add_argument("--out", required=True, help="the stage-1 checkpoint to write, with the fine-tuned model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint or codes file at --out")
    p.add_argument("--epochs", type=int, default=5, help="passes over the codes (Table A2: 5)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=256, help="Table A2: 256")
    p.add_argument("--lr", type=float, default=1e-4, help="stage 1's lr (the tiny preset's: 1e-3)")
    p.add_argument("--mix-true", type=float, default=0.5,
                   help="fraction of each batch with the tokenizer's own tokens instead of the generator's")
    p.add_argument("--max-val-rows", type=int, default=None, help="only the first held-out rows")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_finetune_recovery)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_args in (add_extract_args, add_train_args, add_sample_args, add_nll_args, add_finetune_recovery_args):
        add_args(sub)
    return parser


def check_args(args):
    """One clear line for every argument that cannot work, before anything is built."""
    positive = {"extract": ["num_images", "batch_size"],
                "train": ["steps", "epochs", "batch_size", "log_every", "ckpt_every", "stop_at", "grad_accum"],
                "sample": ["num_per_class", "batch_size", "num_steps"], "nll": ["max_rows", "batch_size"],
                "finetune-recovery": ["epochs", "steps", "batch_size", "max_val_rows", "log_every"]}[args.command]
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    common.check_device(args.device)
    if args.command == "extract":
        common.refuse_output_over_inputs({"--out": args.out}, {"--tokenizer": args.tokenizer})
        common.check_output_file(args.out, "--out", args.overwrite)
        if args.keep and any(K < 1 for K in args.keep):
            raise ValueError(f"--keep counts must be positive, got {args.keep}")
        if args.workers is not None and args.workers < 0:
            raise ValueError(f"--num-workers must be 0 or more, got {args.workers}")
        if args.data and args.data not in data_lib.SHAPES_DATA and not os.path.isdir(args.data):
            raise FileNotFoundError(f"--data {args.data}: no such folder")
        if not os.path.isfile(args.tokenizer):
            raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such file")
    if args.command == "train":
        if args.lr is not None and not 0 < args.lr < float("inf"):         # also catches nan
            raise ValueError(f"--lr must be positive and finite, got {args.lr}")
        for flag, v in [("--label-smoothing", args.label_smoothing), ("--dropout", args.dropout),
                        ("--class-dropout", args.class_dropout)]:
            if v is not None and not 0 <= v < 1:
                raise ValueError(f"{flag} must lie in [0, 1), got {v}")
        if args.window is not None and args.window < 0:
            raise ValueError(f"--window must be 0 or more, got {args.window}")
        if args.warmup_steps is not None and args.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
        if args.tokens != "merged" and args.model != "randar":
            raise ValueError(f"--tokens {args.tokens} is for --model randar (the raster models always read the N "
                             f"recovered codes)")
        check_dit_train_args(args)
        if not os.path.isfile(args.codes):
            raise FileNotFoundError(f"--codes {args.codes}: no such file (write it with `train_stage2.py extract`)")
        if args.resume and not os.path.isfile(args.resume):
            raise FileNotFoundError(f"--resume {args.resume}: no such file")
        return check_train_folder(args)
    if args.command == "finetune-recovery":
        if not 0 < args.lr < float("inf"):
            raise ValueError(f"--lr must be positive and finite, got {args.lr}")
        if not 0 <= args.mix_true < 1:
            raise ValueError(f"--mix-true must lie in [0, 1), got {args.mix_true}")
        common.refuse_output_over_inputs({"--out": args.out}, {"--ckpt": args.ckpt, "--codes": args.codes,
                                                               "--val-codes": args.val_codes,
                                                               "--tokenizer": args.tokenizer})
        common.check_output_file(args.out, "--out", args.overwrite)
    if args.command in ("nll", "finetune-recovery"):
        for flag, path in [("--ckpt", args.ckpt), ("--codes", args.codes)] + \
                ([("--val-codes", args.val_codes)] if getattr(args, "val_codes", None) else []):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{flag} {path}: no such file")
    if args.command == "sample":
        if not os.path.isfile(args.ckpt):
            raise FileNotFoundError(f"--ckpt {args.ckpt}: no such file")
        if not 0 <= args.cfg < float("inf"):                                # also catches nan
            raise ValueError(f"--cfg must be a finite scale >= 0 (1: no guidance, 0: the unconditional model), got "
                             f"{args.cfg}")
        if not 0 < args.temperature < float("inf") or not 0 < args.top_p <= 1 or args.top_k < 0:
            raise ValueError(f"sampling needs a finite --temperature > 0, 0 < --top-p <= 1, --top-k >= 0; got "
                             f"{args.temperature}, {args.top_p}, {args.top_k}")
        if args.out:
            check_sample_out(args, sample_out(args, {}))


# `train` flags of one family of models: the GPTs' and the DiT's
GPT_ONLY_FLAGS = {"gpt": "--gpt", "label_smoothing": "--label-smoothing", "dropout": "--dropout",
                  "class_cond": "--class-cond", "window": "--window"}
DIT_ONLY_FLAGS = {"dit": "--dit", "ema_decay": "--ema-decay"}


def check_dit_train_args(args):
    """One line for a flag of the GPTs given with --model dit, or of the DiT with a GPT."""
    if args.model == "dit":
        given = [flag for name, flag in GPT_ONLY_FLAGS.items() if getattr(args, name) is not None]
        given += ["--checkpoint-activations"] if args.checkpoint_activations else []
        given += ["--rep source"] if args.rep != "codes" else []
        if given:
            raise ValueError(f"{', '.join(given)}: not a setting of --model dit (its size is --dit)")
        if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
            raise ValueError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
    else:
        given = [flag for name, flag in DIT_ONLY_FLAGS.items() if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: a setting of --model dit, not of {args.model}")


def check_train_folder(args):
    """`train`'s --out, on every rank before anything is built or printed (common.checked_on_every_rank): rank 0
    takes the folder's lock (common.RunLock, returned); a folder holding a run is refused unless continued or
    overwritten, and --overwrite never deletes a stage-1 run or a folder the codes, their tokenizer or --resume live
    in (the generator could never be sampled without its tokenizer); a --resume of other settings or codes is
    refused before the memory estimate."""
    out = train_out_dir(args)
    common.check_output_path(out, "--out", folder=True)
    lock = common.RunLock(out).acquire() if common.is_main() else None
    try:
        table = read_codes(args.codes)                                      # memory-mapped
        inputs = [("--codes", args.codes), (f"the tokenizer of --codes", table["tokenizer"]),
                  ("--resume", args.resume)]
        args.overwrite_files = common.check_run_folder(out, args.resume, args.overwrite, kind="stage-2",
                                                       inputs=inputs)
        common.refuse_output_over_inputs([("--out", os.path.join(out, name)) for name in common.RUN_FILES],
                                         {"--codes": args.codes})
        if args.resume:
            read_resume(args.resume, args, build_train_config(args), codes_identity(table, args.codes), mmap=True)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def train_out_dir(args):
    grid = "-grid" if args.model == "randar" and args.tokens == "grid" else ""
    return args.out or os.path.join("runs", f"stage2-{args.model}{grid}-{args.preset}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    name = f"train_stage2.py {args.command}"
    try:
        if args.func is not None:                                           # extract, sample, nll, finetune-recovery
            check_args(args)
            with common.signals_raise():                                    # a signal removes the partial file
                return args.func(args)
        if args.deterministic:
            common.use_deterministic_algorithms()                           # before the first cuBLAS call
        common.run_distributed(lambda rank, world, device: train(args, rank, world, device), args.device,
                               check=lambda: check_args(args), prog=name)
    except common.InputError:                                               # its line is printed (rank 0)
        return 2
    except (ValueError, FileNotFoundError, FloatingPointError) as e:        # bad input or a diverged run
        print(f"{name}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    except common.Stopped as e:
        print(f"{name}: stopped by {e.signal}: nothing written (no partial file left); rerun: python "
              f"train_stage2.py {shlex.join(argv)}", file=sys.stderr, flush=True)
        return 128 + int(getattr(signal, e.signal))
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
