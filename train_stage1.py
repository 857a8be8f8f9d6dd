"""Stage 1: train the MergeVQ tokenizer (paper Sec. 3, Appendix A.1, Table A1).

One script for one process or many (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK): nccl on GPUs, gloo on the CPU.
Losses (each logged on its own; weights from Table A1 per variant):
  L2 reconstruction (--recon-loss l1: the authors' release), LPIPS-VGG perceptual, PatchGAN hinge discriminator
  loss + LeCam regularisation, generator GAN loss, LFQ commitment + entropy, source recovery cross-entropy
  (Eq. 9), global alignment to a frozen DINOv2 teacher (Eq. 10; --align-loss kl: the release).
Without pretrained weights (VGG16 + LPIPS, DINOv2) the terms that need them are dropped, loudly.

    # a CPU smoke run on the embedded procedural data (no download)
    python train_stage1.py --variant g --preset tiny --steps 50
    # the README quick start: two processes on the CPU
    torchrun --nproc_per_node=2 train_stage1.py --variant g --preset tiny --steps 600
    # the paper: G on ImageNet with 8 GPUs (defaults reproduce Table A1)
    torchrun --nproc_per_node=8 train_stage1.py --variant g --data /path/to/imagenet/train \\
        --lpips-vgg-weights download --lpips-lin-weights download --dinov2-weights download
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data as data_lib
import losses
from merge import KeptTokenSampler
from tokenizer import build_tokenizer, get_config, TokenizerConfig

# ----------------------------------------------------------------------------------------------------------------
# Training configuration: Table A1 (paper) and a CPU preset (tiny)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    batch_size: int = 256          # global batch, split over the processes
    epochs: int = 270              # G and G+R: 270, R: 300
    steps: int = 0                 # > 0 overrides epochs
    lr: float = 1e-4
    betas: tuple = (0.5, 0.9)
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    ema: float = 0.999
    lr_schedule: str = "step"      # G, G+R: step (x0.1 drops); R: cosine
    lr_drops: tuple = (0.9,)       # fractions of training where the step schedule multiplies the lr by 0.1
    warmup_steps: int = 0
    disc_start: int = 0            # step at which the discriminator and the generator GAN loss start
    # loss weights (Table A1)
    w_recon: float = 1.0
    w_perceptual: float = 0.7
    w_gan: float = 0.8
    w_lecam: float = 0.01
    w_commit: float = 0.25
    w_entropy: float = 0.1
    w_recovery: float = 0.5        # G, G+R: 0.5; R: 1.0
    w_align: float = 0.1           # G: 0.1; G+R, R: 1.0
    recon_loss: str = "l2"         # paper; the release uses l1
    gan_loss: str = "hinge"        # paper: hinge; the release: non-saturating with a fixed weight 0.1
    adaptive_gan_weight: bool = False
    align_loss: str = "ce"         # paper: DINO-style cross-entropy; the release: KL at temperature 4
    align_size: int = 224          # the student's and the teacher's view size
    log_every: int = 50
    ckpt_every: int = 5000
    sample_every: int = 5000
    workers: int = 8


TRAIN_PRESETS = {
    "paper": {
        "g": TrainConfig(),
        "gr": TrainConfig(w_align=1.0),
        "r": TrainConfig(epochs=300, lr_schedule="cosine", w_recovery=1.0, w_align=1.0),
    },
    # tiny: minutes on a 2-core CPU; the same losses and weights, a small batch, frequent logs and pictures. The
    # discriminator starts for the last quarter only, with the adaptive weight: a fixed 0.8 GAN weight on a barely
    # trained tiny decoder blew the reconstruction MSE up from 0.17 to 0.51 (measured, disc_start 200 of 600).
    "tiny": {
        v: dataclasses.replace(c, batch_size=16, epochs=0, steps=600, disc_start=450, adaptive_gan_weight=True,
                               align_size=56, log_every=10, ckpt_every=200, sample_every=200, workers=0, lr=1e-3)
        for v, c in [("g", TrainConfig()), ("gr", TrainConfig(w_align=1.0)),
                     ("r", TrainConfig(lr_schedule="cosine", w_recovery=1.0, w_align=1.0))]
    },
}

# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers: one code path for 1 and many processes
# ----------------------------------------------------------------------------------------------------------------


def setup_distributed(device_arg=None):
    """Returns (rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is rank 0 of 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_mean(t):
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def rank0_print(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled, the same permutation on every rank for an epoch) that can start mid-epoch,
    so a resumed run sees exactly the samples the uninterrupted run would have seen."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, complete, checked on load
# ----------------------------------------------------------------------------------------------------------------


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()[1], "numpy": torch.from_numpy(
        np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, payload):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, variant=None):
    """torch.load(weights_only=True) with clear errors for a missing, corrupt or other-variant checkpoint."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong file type, pickled code
        raise ValueError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a mergevq checkpoint "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "tokenizer_config" not in ckpt:
        raise ValueError(f"{path} is not a mergevq stage-1 checkpoint (no model / tokenizer_config entries)")
    if variant is not None and ckpt["tokenizer_config"]["variant"] != variant:
        raise ValueError(f"{path} is a checkpoint of variant {ckpt['tokenizer_config']['variant']!r}, but "
                         f"--variant {variant!r} was asked for: use the matching --variant or another checkpoint")
    return ckpt


def load_tokenizer_checkpoint(path, ema=True, device="cpu"):
    """Build the tokenizer stored in a stage-1 checkpoint and load its EMA (default) or raw weights."""
    ckpt = load_checkpoint(path)
    config = TokenizerConfig(**ckpt["tokenizer_config"])
    model = build_tokenizer(config.variant, config=config)
    model.load_state_dict(ckpt["ema" if ema else "model"], strict=True)
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------------------------
# Losses of one step
# ----------------------------------------------------------------------------------------------------------------


class Stage1Forward(torch.nn.Module):
    """The generator's forward for one step in one module call, so DistributedDataParallel sees every parameter:
    reconstruction at K kept tokens, and the alignment prediction on the student's view."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, x, keep, align_view=None):
        out = self.tokenizer(x, keep=keep)
        pred = self.tokenizer.align(align_view, keep=keep) if align_view is not None else None
        return out, pred


def lr_at(step, total, cfg):
    """Step schedule (x0.1 at each fraction in lr_drops) or cosine, after an optional linear warm-up."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    return cfg.lr * 0.1 ** sum(step >= int(f * total) for f in cfg.lr_drops)


def check_finite(terms, step):
    """Stop every rank with a message naming the loss term when a loss is NaN or infinite."""
    names = list(terms)
    values = torch.stack([terms[n].detach().float() for n in names])
    flags = (~torch.isfinite(values)).float()
    if dist.is_initialized():
        dist.all_reduce(flags)
    bad = [n for n, f in zip(names, flags.tolist()) if f > 0]
    if bad:
        raise FloatingPointError(f"non-finite loss at step {step}: {', '.join(bad)} "
                                 f"(values on this rank: {[terms[n].item() for n in bad]}); stopping")


# ----------------------------------------------------------------------------------------------------------------
# Pictures: originals, reconstructions at several K, merge groups
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def write_samples(model, x, path, keeps):
    """Rows: originals, reconstructions at each K, then the merge groups at the first K drawn over the image."""
    model.eval()
    rows = [x]
    for K in keeps:
        rows.append(model(x, keep=K).recon.clamp(-1, 1))
    enc = model.encode(x, keep=keeps[0])
    assign = enc.source.argmax(dim=1)                                       # (B, N) merged token of each token
    grid = int(round(math.sqrt(assign.shape[1])))
    rows.append(torch.stack([data_lib.overlay(img, data_lib.colorize_groups(a, (grid, grid), x.shape[-1]))
                             for img, a in zip(x, assign)]))
    data_lib.save_image_grid(torch.cat(rows).float().cpu(), path, nrow=x.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--variant", required=True, choices=["g", "gr", "r"], help="G, G+R or R (Table A1)")
    p.add_argument("--preset", default="paper", choices=["paper", "tiny"], help="model and schedule size")
    p.add_argument("--data", default=None, help="ImageFolder root (DIR/class/*.jpg); default: embedded shapes")
    p.add_argument("--out", default=None, help="output folder (default runs/stage1-<variant>-<preset>)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (Table A1: 256)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (Table A1: 1e-4)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop at this step with a checkpoint (e.g. a job time limit); continue with --resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=int, default=None, help="a fixed kept-token count K instead of sampling")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers per process")
    p.add_argument("--recon-loss", choices=["l2", "l1"], default=None)
    p.add_argument("--gan-loss", choices=["hinge", "non-saturating"], default=None)
    p.add_argument("--adaptive-gan-weight", action="store_true", default=None)
    p.add_argument("--align-loss", choices=["ce", "kl"], default=None)
    p.add_argument("--gan-weight", type=float, default=None, dest="w_gan", metavar="W",
                   help="generator GAN loss weight (Table A1: 0.8; the release: 0.1)")
    p.add_argument("--perceptual-weight", type=float, default=None, dest="w_perceptual", metavar="W",
                   help="LPIPS weight (Table A1: 0.7; the release: 1.0)")
    p.add_argument("--disc-start", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--sample-every", type=int, default=None)
    p.add_argument("--merge-schedule", choices=["square", "linear"], default=None,
                   help="per-layer merge amounts (paper: square; release: linear)")
    p.add_argument("--lpips-vgg-weights", default=None, help="torchvision vgg16-397923af.pth path or 'download'")
    p.add_argument("--lpips-lin-weights", default=None, help="LPIPS v0.1 vgg.pth path or 'download'")
    p.add_argument("--dinov2-weights", default=None,
                   help="dinov2_vitb14_pretrain.pth path or 'download': the alignment teacher and (G, G+R) the "
                        "encoder's weight selection")
    p.add_argument("--amp", choices=["bf16", "none"], default=None, help="autocast (default: bf16 on GPU only)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    return p.parse_args(argv)


def build_train_config(args):
    cfg = TRAIN_PRESETS[args.preset][args.variant]
    overrides = {k: getattr(args, k) for k in ["steps", "epochs", "batch_size", "lr", "workers", "recon_loss",
                                               "gan_loss", "adaptive_gan_weight", "align_loss", "disc_start", "w_gan",
                                               "w_perceptual", "log_every", "ckpt_every", "sample_every"]
                 if getattr(args, k) is not None}
    return dataclasses.replace(cfg, **overrides)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device):
    cfg = build_train_config(args)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    local_batch = cfg.batch_size // world
    out_dir = args.out or os.path.join("runs", f"stage1-{args.variant}-{args.preset}")
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" else contextlib.nullcontext
    torch.manual_seed(args.seed * world + rank)          # per-rank seed (DiT); model init is broadcast by DDP

    # ---- model, EMA, discriminator --------------------------------------------------------------------------
    overrides = {k: v for k, v in [("image_size", args.image_size), ("merge_schedule", args.merge_schedule)]
                 if v is not None}
    tok_cfg = get_config(args.variant, args.preset, **overrides)
    torch.manual_seed(args.seed)                          # identical initial weights on every rank
    model = build_tokenizer(args.variant, config=tok_cfg).to(device)
    disc = losses.NLayerDiscriminator().to(device)
    torch.manual_seed(args.seed * world + rank)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    lecam = losses.LeCam().to(device)
    sampler_K = KeptTokenSampler(tok_cfg.keep, tok_cfg.keep_low, tok_cfg.keep_high,
                                 kind="fixed" if args.keep else tok_cfg.keep_sampling, seed=args.seed)
    if args.keep is not None:
        model.check_keep(args.keep)                       # a clear error for a K that is not allowed

    # ---- pretrained networks: used when given, dropped loudly when not ---------------------------------------
    lpips = None
    if args.lpips_vgg_weights and args.lpips_lin_weights:
        lpips = losses.LPIPS(vgg_weights=args.lpips_vgg_weights, lin_weights=args.lpips_lin_weights).to(device)
    else:
        rank0_print("WARNING: no LPIPS weights (--lpips-vgg-weights, --lpips-lin-weights): the perceptual loss is "
                    "DROPPED (a random VGG is not a perceptual metric).")
    teacher = None
    if args.dinov2_weights:
        teacher = losses.DINOv2()
        losses.load_dinov2(teacher, args.dinov2_weights)
        teacher = teacher.to(device).eval().requires_grad_(False)
        if args.variant in ("g", "gr") and not args.resume:
            loaded = model.load_dinov2_selection(teacher.state_dict())
            ema.load_state_dict(model.state_dict())
            rank0_print(f"DINOv2 weight selection: {len(loaded)} encoder tensors initialised from the teacher")
    else:
        rank0_print("WARNING: no DINOv2 weights (--dinov2-weights): the global alignment loss (Eq. 10) is DROPPED "
                    "and the encoder starts from random weights instead of DINOv2 weight selection.")

    forward = Stage1Forward(model)
    if world > 1:
        forward = DDP(forward, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=teacher is None)   # without a teacher the alignment head is unused
        disc_ddp = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        disc_ddp = disc
    opt_g = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    # ---- data ----------------------------------------------------------------------------------------------
    dataset = data_lib.build_dataset(args.data, split="train", size=tok_cfg.image_size)
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one batch of {cfg.batch_size}")
    sampler = ResumableSampler(dataset, world, rank, seed=args.seed)
    steps_per_epoch = len(dataset) // cfg.batch_size
    total = cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch
    held_out = data_lib.build_dataset(args.data, split="val", size=tok_cfg.image_size)
    sample_batch = torch.stack([held_out[i][0] for i in range(min(8, len(held_out)))]).to(device)

    # ---- resume --------------------------------------------------------------------------------------------
    step = 0
    if args.resume:
        ckpt = load_checkpoint(args.resume, variant=args.variant)
        if ckpt["tokenizer_config"] != dataclasses.asdict(tok_cfg):
            raise ValueError(f"{args.resume} was trained with another tokenizer configuration (preset or overrides "
                             f"differ): {ckpt['tokenizer_config']}")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        disc.load_state_dict(ckpt["disc"])
        lecam.load_state_dict(ckpt["lecam"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        step = ckpt["step"]
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        rank0_print(f"resumed from {args.resume} at step {step}")

    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({"args": vars(args), "train": dataclasses.asdict(cfg), "tokenizer": dataclasses.asdict(tok_cfg),
                       "world_size": world}, f, indent=2)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"stage 1 | variant {args.variant} preset {args.preset} | {n_params / 1e6:.2f}M parameters | "
              f"{world} process(es) on {device} | global batch {cfg.batch_size} | {total} steps "
              f"({steps_per_epoch} per epoch) | N={tok_cfg.num_tokens} tokens, target K={tok_cfg.keep} | "
              f"amp {amp} | out {out_dir}", flush=True)

    def snapshot():
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        return {"model": model.state_dict(), "ema": ema.state_dict(), "disc": disc.state_dict(),
                "lecam": lecam.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                "step": step, "tokenizer_config": dataclasses.asdict(tok_cfg), "train_config": dataclasses.asdict(cfg),
                "variant": args.variant, "preset": args.preset, "rng": rngs, "world_size": world}

    # ---- the loop ------------------------------------------------------------------------------------------
    log_path = os.path.join(out_dir, "log.jsonl")
    bar = tqdm(total=total, initial=step, disable=rank != 0, dynamic_ncols=True, desc=f"stage1-{args.variant}")
    t_start, images_seen = time.time(), 0
    running = {}
    stop = min(total, args.stop_at) if args.stop_at else total
    while step < stop:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.start = in_epoch * local_batch
        loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=cfg.workers,
                            drop_last=True, pin_memory=device.type == "cuda", persistent_workers=False)
        for x, _ in loader:
            if step >= stop:
                break
            x = x.to(device, non_blocking=True)
            K = args.keep or sampler_K.sample(step)
            lr = lr_at(step, total, cfg)
            for opt in (opt_g, opt_d):
                for group in opt.param_groups:
                    group["lr"] = lr
            gan_on = step >= cfg.disc_start

            # Views for the global alignment (Eq. 10): the teacher sees the resized image, the student a random
            # resized crop with flip. The crop draws depend on (seed, step, rank) only: exact on resume.
            align_view = teacher_in = None
            if teacher is not None:
                g = torch.Generator(device="cpu").manual_seed((args.seed * 1_000_003 + step) * world + rank)
                align_view = data_lib.random_resized_crop(x.cpu(), cfg.align_size, generator=g).to(device)
                teacher_in = losses.dinov2_preprocess(x, size=cfg.align_size)

            # ---- generator step --------------------------------------------------------------------------
            with autocast():
                out, pred = forward(x, K, align_view)
                recon = out.recon.float()
                terms = {}
                terms["recon"] = F.mse_loss(recon, x) if cfg.recon_loss == "l2" else F.l1_loss(recon, x)
                if lpips is not None:
                    terms["perceptual"] = lpips(recon, x).mean()
                lfq = out.enc.lfq
                terms["commit"] = lfq.commitment
                terms["entropy"] = lfq.per_sample_entropy - lfq.codebook_entropy
                terms["recovery"] = out.recovery_loss
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(teacher_in).float()
                    align = losses.alignment_loss_ce if cfg.align_loss == "ce" else losses.alignment_loss_kl
                    terms["align"] = align(pred.float(), target)
                nll = (cfg.w_recon * terms["recon"] + cfg.w_perceptual * terms.get("perceptual", 0.0))
                total_g = (nll + cfg.w_commit * terms["commit"] + cfg.w_entropy * terms["entropy"]
                           + cfg.w_recovery * terms["recovery"] + cfg.w_align * terms.get("align", 0.0))
                if gan_on:
                    logits_fake = disc_ddp(recon).float()
                    terms["gan_g"] = (losses.hinge_g_loss(logits_fake) if cfg.gan_loss == "hinge"
                                      else losses.non_saturating_g_loss(logits_fake))
                    w = cfg.w_gan
                    if cfg.adaptive_gan_weight:
                        w = w * losses.adaptive_weight(nll, terms["gan_g"], model.decoder.last_layer_weight())
                    total_g = total_g + w * terms["gan_g"]
            check_finite(terms, step)
            opt_g.zero_grad(set_to_none=True)
            total_g.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt_g.step()

            # ---- discriminator step: hinge loss + LeCam ----------------------------------------------------
            if gan_on:
                with autocast():
                    logits_real = disc_ddp(x).float()
                    logits_fake = disc_ddp(recon.detach()).float()
                    d_terms = {"disc": (losses.hinge_d_loss(logits_real, logits_fake) if cfg.gan_loss == "hinge"
                                        else losses.vanilla_d_loss(logits_real, logits_fake)),
                               "lecam": lecam.penalty(logits_real, logits_fake)}
                check_finite(d_terms, step)
                opt_d.zero_grad(set_to_none=True)
                (d_terms["disc"] + cfg.w_lecam * d_terms["lecam"]).backward()
                torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
                opt_d.step()
                lecam.update(logits_real.detach(), logits_fake.detach())
                terms.update(d_terms)

            # ---- EMA of the tokenizer weights ---------------------------------------------------------------
            # Warm-up (as TF's ExponentialMovingAverage with num_updates): the decay grows as (1 + t) / (10 + t)
            # up to cfg.ema, so a short run's EMA is not mostly its random initialisation (0.999^600 = 0.55).
            decay = min(cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm.detach(), 1 - decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)

            step += 1
            images_seen += cfg.batch_size
            for k, v in terms.items():
                running[k] = running.get(k, 0.0) + v.detach().float()
            running["_n"] = running.get("_n", 0) + 1
            bar.update(1)

            # ---- logging (all-reduced means), pictures, checkpoints -----------------------------------------
            if step % cfg.log_every == 0 or step in (total, stop):
                n = running.pop("_n")
                names = sorted(running)
                vals = all_reduce_mean(torch.stack([running[k] / n for k in names]))
                row = {"step": step, "lr": lr, "K": K, **{k: round(v, 5) for k, v in zip(names, vals.tolist())},
                       "images_per_s": round(images_seen / (time.time() - t_start), 2)}
                running = {}
                if rank == 0:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k not in ("step", "lr")})
                    with open(log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
            if rank == 0 and (step % cfg.sample_every == 0 or step in (total, stop)):
                keeps = sorted({tok_cfg.keep, *[c for c in sampler_K.candidates][-1:], tok_cfg.num_tokens})
                write_samples(ema, sample_batch, os.path.join(out_dir, f"samples_{step:07d}.png"), keeps)
            if step % cfg.ckpt_every == 0 or step in (total, stop):
                payload = snapshot()                      # every rank takes part (RNG states are gathered)
                if rank == 0:
                    save_checkpoint(os.path.join(out_dir, "last.pt"), payload)
                if dist.is_initialized():
                    dist.barrier()
    bar.close()
    # Unreadable images were skipped (data.ImageFolder replaces them); count them over all ranks. With
    # --workers > 0 the skips happen in the worker processes and are reported by the workers' warnings only.
    skipped = torch.tensor([float(getattr(dataset, "num_skipped", 0))], device=device)
    if dist.is_initialized():
        dist.all_reduce(skipped)
    if rank == 0 and skipped.item() > 0:
        print(f"skipped {int(skipped.item())} unreadable image(s) in {args.data}: "
              f"{', '.join(map(str, list(getattr(dataset, 'skipped', []))[:5]))}", flush=True)
    if rank == 0:
        elapsed = time.time() - t_start
        print(f"done: {step} steps in {elapsed:.1f} s ({images_seen / max(elapsed, 1e-9):.1f} images/s); "
              f"checkpoint {os.path.join(out_dir, 'last.pt')}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad input or a diverged run: no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
