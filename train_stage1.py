"""Stage 1: train the MergeVQ tokenizer (paper Sec. 3, Appendix A.1, Table A1).

One script for one process or many (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK): nccl on GPUs, gloo on the CPU.
The loop below follows the paper's training: a kept count K per step (Appendix A.3, Eq. (15)-(16)), the
tokenizer's objective (losses.generator_loss: reconstruction, LPIPS, the commitment of LFQ (Eq. (4)) and
MAGVIT-v2's entropy penalty, the source recovery cross-entropy (Eq. (9)), the global alignment to a frozen DINOv2
teacher (Eq. (10)), the PatchGAN generator loss) and the discriminator's (losses.discriminator_loss: hinge +
LeCam), EMA weights, atomic checkpoints.
Without pretrained weights (VGG16 + LPIPS, DINOv2) the terms that need them are dropped, loudly.
`--variant mergetok` trains MergeTok (arXiv 2605.30904; mergetok.py) with the same loop: both of its
reconstructions get the reconstruction, perceptual and GAN losses, plus its KL, (i) semantic alignment and
(ii) group constraints (--kl-weight, --sem-weight, --intra-weight, --exc-weight; 0 switches a term off, which is
then still logged).
Every step logs `batch_usage`: the distinct LFQ codes of the global batch over min(2^d, its merged tokens).

    # a CPU smoke run on the embedded procedural data (no download)
    python train_stage1.py --variant g --preset tiny --steps 50
    python train_stage1.py --variant mergetok --preset tiny --steps 50
    # the README quick start: two processes on the CPU
    torchrun --nproc_per_node=2 train_stage1.py --variant g --preset tiny
    # the paper: G on ImageNet with 8 GPUs (defaults reproduce Table A1)
    torchrun --nproc_per_node=8 train_stage1.py --variant g --data /path/to/imagenet/train \\
        --lpips-vgg-weights download --lpips-lin-weights download --dinov2-weights download

SIGTERM (a scheduler's preemption) or Ctrl-C: the run stops at its next stop point (before the tokenizer's forward
or its update, or at the end of a step; a step cut short is dropped), writes a checkpoint and exits 0 (under torchrun
the workers do; torchrun itself, once signalled, exits 1 with a SignalException traceback); `--resume
<out>/last.pt` continues exactly. One job at a time writes a run folder (its run.lock); under torchrun the workers
end when the launcher dies. docs/runs.md has the bound and the save times.
"""
import argparse
import contextlib
import copy
import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import common
import data as data_lib
import losses
import mergetok
from merge import KeptTokenSampler
from lfq import CodebookUsage
from resources import check_stage1 as check_resources, stage1_memory as memory_estimate  # noqa: F401
from tokenizer import ALL_VARIANTS, build_tokenizer, count_parameters, get_config

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
    # MergeTok (arXiv 2605.30904; our choices, mergetok.py gives the reasons); ignored by g, gr, r
    w_kl: float = 1e-4             # KL of every token's posterior to N(0, I), averaged over tokens: a small weight
    w_sem: float = 0.1             # (i) merged-token semantic alignment
    w_intra: float = 0.1           # (ii) intra-group diversity: mean code collision k_ij inside a group
    w_exc: float = 0.1             # (ii) inter-group exclusivity: mean k_ij across groups
    group_tau: float = 1.0         # s_ib = sigmoid(4 u_ib / tau) of (ii) (LFQ's own tau is 0.01)
    sem_margin: float = 0.5        # margin of the --sem-target dinov2 cosine loss
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
    # tiny: the README's quick start on 2 CPU cores, the paper's losses at settings that learn in its budget (each
    # one's measurement: docs/tokenizer_cpu.md, "How the tiny settings were chosen"):
    #  - no discriminator (disc_start past the end): without pretrained LPIPS there is no perceptual loss, and the
    #    PatchGAN cost time and PSNR that more steps buy back;
    #  - LFQ entropy weight 0.02 instead of 0.1: the batch entropy of 16 images pulls the codes apart harder than
    #    reconstruction can use at this scale;
    #  - source recovery weight 0.1 instead of 0.5: its gradient reaches the encoder through the codes and costs
    #    reconstruction;
    #  - lr 1e-3 with the step schedule (x0.1 at 90%), batch 16.
    "tiny": {
        v: dataclasses.replace(c, batch_size=16, epochs=0, steps=1000, disc_start=10 ** 9, w_entropy=0.02,
                               w_recovery=0.1, adaptive_gan_weight=True, align_size=56, log_every=10, ckpt_every=200,
                               sample_every=200, workers=0, lr=1e-3)
        for v, c in [("g", TrainConfig()), ("gr", TrainConfig(w_align=1.0)),
                     ("r", TrainConfig(lr_schedule="cosine", w_align=1.0))]
    },
}
# MergeTok trains as G at either scale (its encoder and decoder are G's), with its own weights above.
for _presets in TRAIN_PRESETS.values():
    _presets["mergetok"] = _presets["g"]
MERGETOK_FLAGS = {"w_kl": "--kl-weight", "w_sem": "--sem-weight", "w_intra": "--intra-weight",
                  "w_exc": "--exc-weight", "group_tau": "--group-tau", "sem_target": "--sem-target"}

# Fields a resumed run may change; every other one must equal the checkpoint's (a different batch size or lr would
# silently make the "continued" run a different run).
RESUMABLE_CHANGES = ("log_every", "ckpt_every", "sample_every", "workers")
SAMPLE_PICTURES = ("samples_*.png",)                 # the pictures a run writes beside its checkpoint

# ----------------------------------------------------------------------------------------------------------------
# Command line, checked before anything is built
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--variant", required=True, choices=list(ALL_VARIANTS),
                   help="G, G+R or R (Table A1), or MergeTok (arXiv 2605.30904)")
    p.add_argument("--preset", default="paper", choices=["paper", "tiny"], help="model and schedule size")
    p.add_argument("--data", default=None, help="ImageFolder root (DIR/class/*.jpg); default: the embedded shapes "
                                                "(shapes; shapes-rich: textured backgrounds, distractors, any colour)")
    p.add_argument("--out", default=None, help="output folder (default runs/stage1-<variant>-<preset>)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (Table A1: 256)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (Table A1: 1e-4)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out folder that holds one: that run's last.pt, config.json, "
                        "log.jsonl and samples_*.png are deleted first, other files stay (without it such a folder "
                        "is refused; a stage-2 run, or a folder an input lives in, is refused even with it)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop at this step with a checkpoint (e.g. a job time limit); continue with --resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=int, default=None, dest="K", metavar="K",
                   help="a fixed kept count K instead of sampling it around the target")
    p.add_argument("--keep-sampling", choices=["exponential", "gaussian", "fixed"], default=None, dest="K_sampling",
                   help="weights of the candidate K (paper: Eq. (15) for G and R, Eq. (16) for G+R)")
    p.add_argument("--keep-offsets", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"), dest="K_offsets",
                   help="candidates (sqrt(K) + i)^2 for i = LOW..HIGH (the release's G: --keep-sampling gaussian "
                        "--keep-offsets -1 7, i.e. 225..529)")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers per process (default: the "
                                                             "preset's, at most the cores each process has)")
    p.add_argument("--recon-loss", choices=["l2", "l1"], default=None)
    p.add_argument("--gan-loss", choices=["hinge", "non-saturating"], default=None,
                   help="generator GAN loss (paper: hinge; the release: non-saturating on each image's mean "
                        "PatchGAN logit); the discriminator's loss is hinge in both")
    p.add_argument("--adaptive-gan-weight", action="store_true", default=None)
    p.add_argument("--align-loss", choices=["ce", "kl"], default=None)
    p.add_argument("--gan-weight", type=float, default=None, dest="w_gan", metavar="W",
                   help="generator GAN loss weight (Table A1: 0.8; the release: 0.1)")
    p.add_argument("--perceptual-weight", type=float, default=None, dest="w_perceptual", metavar="W",
                   help="LPIPS weight (Table A1: 0.7; the release: 1.0)")
    p.add_argument("--disc-start", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--sample-every", type=int, default=None,
                   help="steps between sample pictures, and one at the last step (0: no pictures)")
    p.add_argument("--merge-schedule", choices=["square", "linear"], default=None,
                   help="per-layer merge amounts (paper: square; release: linear)")
    p.add_argument("--lpips-vgg-weights", default=None, help="torchvision vgg16-397923af.pth path or 'download'")
    p.add_argument("--lpips-lin-weights", default=None, help="LPIPS v0.1 vgg.pth path or 'download'")
    p.add_argument("--dinov2-weights", default=None,
                   help="dinov2_vitb14_pretrain.pth path or 'download': the alignment teacher and (G, G+R, MergeTok) the "
                        "encoder's weight selection")
    p.add_argument("--kl-weight", type=float, default=None, dest="w_kl", metavar="W",
                   help="MergeTok: weight of the per-token KL to N(0, I) (default 1e-4)")
    p.add_argument("--sem-weight", type=float, default=None, dest="w_sem", metavar="W",
                   help="MergeTok: weight of (i) merged-token semantic alignment (default 0.1; 0: off)")
    p.add_argument("--intra-weight", type=float, default=None, dest="w_intra", metavar="W",
                   help="MergeTok: weight of (ii) intra-group diversity (default 0.1; 0: off)")
    p.add_argument("--exc-weight", type=float, default=None, dest="w_exc", metavar="W",
                   help="MergeTok: weight of (ii) inter-group exclusivity (default 0.1; 0: off)")
    p.add_argument("--group-tau", type=float, default=None, metavar="TAU",
                   help="MergeTok: tau of the soft bits sigmoid(4 u / tau) of (ii) (default 1.0)")
    p.add_argument("--sem-target", choices=["group", "dinov2"], default=None,
                   help="MergeTok: (i) pulls mu toward its group's mean (default) or toward DINOv2 patch features "
                        "pooled over the group (needs --dinov2-weights)")
    p.add_argument("--amp", choices=["bf16", "none"], default=None,
                   help="autocast (default: bf16 on a GPU or on a CPU that computes bf16 natively, else none)")
    p.add_argument("--deterministic", action="store_true",
                   help="GPU: deterministic kernels (cuBLAS workspace, cuDNN, torch.use_deterministic_algorithms; "
                        "torch warns for an op without one); slower. CPU runs are deterministic already")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    p.add_argument("--lfq-bits", type=int, default=None, metavar="D", dest="lfq_bits",
                   help="override the preset's LFQ bits d (z_channels; 2^d codes). The CPU figures of docs/ marked "
                        "18-bit (before the tiny preset's d = 10) were measured with --lfq-bits 18")
    p.add_argument("--run-anyway", action="store_true",
                   help="start even where the resource check says the run cannot fit or finish (no GPU, too "
                        "little memory)")
    return p.parse_args(argv)


def check_args(args):
    """One clear line for every argument that cannot work, before anything is built or printed (run on every rank:
    common.checked_on_every_rank). Rank 0 takes the run folder's lock (common.RunLock) and returns it."""
    positive = ["steps", "epochs", "batch_size", "log_every", "ckpt_every", "stop_at", "image_size", "lfq_bits"]
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lfq_bits is not None and args.lfq_bits > 24:
        raise ValueError(f"--lfq-bits must be at most 24 (codebook usage keeps a table of 2^d flags), got "
                         f"{args.lfq_bits}")
    if args.lr is not None and not 0 < args.lr < float("inf"):                 # also catches nan
        raise ValueError(f"--lr must be positive and finite, got {args.lr}")
    for flag, value in [("--gan-weight", args.w_gan), ("--perceptual-weight", args.w_perceptual),
                        ("--kl-weight", args.w_kl), ("--sem-weight", args.w_sem), ("--intra-weight", args.w_intra),
                        ("--exc-weight", args.w_exc)]:
        if value is not None and not value >= 0:
            raise ValueError(f"{flag} must be 0 or more, got {value}")
    if args.group_tau is not None and not args.group_tau > 0:
        raise ValueError(f"--group-tau must be positive, got {args.group_tau}")
    if args.variant != "mergetok":
        given = [flag for name, flag in MERGETOK_FLAGS.items() if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: MergeTok settings, for --variant mergetok only")
    if args.sem_target == "dinov2" and not args.dinov2_weights:
        raise ValueError("--sem-target dinov2 needs the DINOv2 teacher: pass --dinov2-weights PATH (or download)")
    for name in ["workers", "sample_every"]:
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.disc_start is not None and args.disc_start < 0:
        raise ValueError(f"--disc-start must be 0 or more, got {args.disc_start}")
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume}: no such file")
    if args.data and args.data not in data_lib.SHAPES_DATA and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such folder")
    common.check_device(args.device)
    out = out_dir(args)
    common.check_output_path(out, "--out", folder=True)
    lock = common.RunLock(out).acquire() if common.is_main() else None     # one job at a time in the folder
    try:
        inputs = {"--lpips-vgg-weights": args.lpips_vgg_weights, "--lpips-lin-weights": args.lpips_lin_weights,
                  "--dinov2-weights": args.dinov2_weights}
        args.overwrite_files = common.check_run_folder(out, args.resume, args.overwrite, SAMPLE_PICTURES, "stage-1",
                                                       [*inputs.items(), ("--data", args.data)])
        common.refuse_output_over_inputs([("--out", os.path.join(out, name)) for name in common.RUN_FILES], inputs)
        if args.resume:                                       # before the memory estimate and any warning
            read_resume(args.resume, args.variant, build_train_config(args), build_tokenizer_config(args),
                        mmap=True)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def out_dir(args):
    return args.out or os.path.join("runs", f"stage1-{args.variant}-{args.preset}")


def build_train_config(args):
    cfg = TRAIN_PRESETS[args.preset][args.variant]
    overrides = {k: getattr(args, k) for k in ["steps", "epochs", "batch_size", "lr", "workers", "recon_loss",
                                               "gan_loss", "adaptive_gan_weight", "align_loss", "disc_start", "w_gan",
                                               "w_perceptual", "log_every", "ckpt_every", "sample_every", "w_kl",
                                               "w_sem", "w_intra", "w_exc", "group_tau"]
                 if getattr(args, k) is not None}
    if args.epochs is not None and args.steps is None:
        overrides["steps"] = 0                                                # --epochs counts, not the preset's steps
    return dataclasses.replace(cfg, **overrides)


def build_tokenizer_config(args):
    overrides = {k: v for k, v in [("image_size", args.image_size), ("z_channels", args.lfq_bits),
                                   ("merge_schedule", args.merge_schedule),
                                   ("K_sampling", args.K_sampling), ("sem_target", args.sem_target)] if v is not None}
    if args.K_offsets is not None:
        overrides["K_low"], overrides["K_high"] = args.K_offsets
    return get_config(args.variant, args.preset, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# Resources: a run that cannot fit stops before it starts (the memory estimate: resources.py)
# ----------------------------------------------------------------------------------------------------------------


def default_workers(cfg_workers):
    """The preset's loader workers, at most the cores each process has beside itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(cfg_workers, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


# ----------------------------------------------------------------------------------------------------------------
# Models, pretrained networks, checkpoints
# ----------------------------------------------------------------------------------------------------------------


class Stage1Forward(torch.nn.Module):
    """The generator's forward for one step in one module call, so DistributedDataParallel sees every parameter:
    reconstruction at K kept tokens, and the alignment prediction on the student's view. noise: the generator
    MergeTok's posterior samples are drawn from (None for MergeVQ, which draws none)."""

    def __init__(self, tokenizer, noise=None):
        super().__init__()
        self.tokenizer, self.noise = tokenizer, noise

    def forward(self, x, K, align_view=None):
        out = self.tokenizer(x, K=K) if self.noise is None else self.tokenizer(x, K=K, generator=self.noise)
        pred = self.tokenizer.align(align_view, K=K) if align_view is not None else None
        return out, pred


def load_pretrained(args, model, ema, device):
    """LPIPS and the DINOv2 teacher when their weights are given (with DINOv2 weight selection for G and G+R on a
    fresh start); otherwise None, loudly."""
    lpips = teacher = None
    if args.lpips_vgg_weights and args.lpips_lin_weights:
        lpips = losses.LPIPS(vgg_weights=args.lpips_vgg_weights, lin_weights=args.lpips_lin_weights).to(device)
    else:
        common.rank0_print("WARNING: no LPIPS weights (--lpips-vgg-weights, --lpips-lin-weights): the perceptual "
                           "loss is DROPPED (a random VGG is not a perceptual metric).")
    if args.dinov2_weights:
        teacher = losses.load_dinov2(losses.DINOv2(), args.dinov2_weights).to(device).eval().requires_grad_(False)
        if args.variant in ("g", "gr", "mergetok") and not args.resume:
            loaded = model.load_dinov2_selection(teacher.state_dict())
            ema.load_state_dict(model.state_dict())
            common.rank0_print(f"DINOv2 weight selection: {len(loaded)} encoder tensors initialised from the teacher")
    else:
        common.rank0_print("WARNING: no DINOv2 weights (--dinov2-weights): the global alignment loss (Eq. 10) is "
                           "DROPPED and the encoder starts from random weights instead of DINOv2 weight selection.")
    return lpips, teacher


RESUME_ENTRIES = ("step", "rng", "train_config", "tokenizer_config", "model", "ema", "disc", "lecam", "opt_g",
                  "opt_d")


def read_resume(path, variant, cfg, tok_cfg, mmap=False):
    """A checkpoint to continue from: readable, written by this script for this variant with the same tokenizer and
    training settings (one line naming the file or the field). mmap: its tensors are not read (check_args)."""
    ckpt = common.read_checkpoint(path, "checkpoint", required=RESUME_ENTRIES, mmap=mmap)
    if ckpt["tokenizer_config"].get("variant") != variant:
        raise ValueError(f"{path} is a checkpoint of variant {ckpt['tokenizer_config'].get('variant')!r}, not "
                         f"{variant!r}: use the matching --variant")
    diff = common.config_mismatch(ckpt["tokenizer_config"], dataclasses.asdict(tok_cfg))
    if diff:
        raise ValueError(f"{path} was trained with another tokenizer configuration: {'; '.join(diff)}")
    saved = {k: v for k, v in ckpt["train_config"].items() if k not in RESUMABLE_CHANGES}
    diff = common.config_mismatch(saved, {k: v for k, v in dataclasses.asdict(cfg).items() if k in saved})
    if diff:
        raise ValueError(f"resuming {path} with other training settings: {'; '.join(diff)} (saved -> now); a "
                         f"resumed run must use the checkpoint's settings")
    return ckpt


def resume(path, run, variant):
    """Load every entry of run.state (model, ema, disc, lecam, opt_g, opt_d), this rank's RNG states and noise
    generator from a checkpoint written by this script with the same settings. Returns the step to continue from."""
    state, rank = run.state, run.rank
    ckpt = read_resume(path, variant, run.cfg, run.tok_cfg)
    common.load_entries(state, ckpt, path)
    rngs = ckpt["rng"]
    common.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    noise = ckpt.get("noise_rng")                                       # older checkpoints: the fresh seed
    if noise:
        run.noise.set_state(noise[rank] if rank < len(noise) else noise[0])
    saved_world = ckpt.get("world_size", run.world)
    common.rank0_print(f"resumed from {path} at step {ckpt['step']}" + (
        "" if saved_world == run.world else
        f" (saved by {saved_world} process(es), continued by {run.world}: the data order, K and the crops continue "
        f"exactly; the per-rank random streams{' (MergeTok noise)' if variant == 'mergetok' else ''} and the "
        f"reduction order are not those of an uninterrupted run)"))
    return ckpt["step"]


def snapshot(run, step, args):
    """Everything a resumed run needs; every rank takes part (the RNG and noise generator states are gathered)."""
    return {**{name: obj.state_dict() for name, obj in run.state.items()}, "step": step,
            "tokenizer_config": dataclasses.asdict(run.tok_cfg), "train_config": dataclasses.asdict(run.cfg),
            "variant": args.variant, "preset": args.preset, "rng": common.all_gather_objects(common.rng_state()),
            "noise_rng": common.all_gather_objects(run.noise.get_state()), "world_size": run.world}


def sample_Ks(run):
    """The kept counts of the sample picture: the K the run trains at (the target and the largest candidate, or
    --keep) and N, each one the run's tokenizer can reach (at a small --image-size the target may exceed N)."""
    trained = [run.fixed_K] if run.fixed_K else [run.tok_cfg.K, run.K_sampler.candidates[-1]]
    Ks = []
    for K in sorted(set(trained + [run.tok_cfg.num_tokens])):
        try:
            Ks.append(run.model.check_K(K))
        except ValueError:
            pass
    return Ks


@torch.no_grad()
def write_samples(model, x, path, Ks):
    """Rows, each captioned: originals, reconstructions at each K (MergeTok: discrete, then continuous), then the
    merge groups at the first K drawn over the image. Assembled on the CPU (data.overlay's tensors live there);
    images under 64 px enlarged (nearest neighbour) to at least 64, so that the groups' borders can be seen."""
    model.eval()
    outs = [model(x, K=K) for K in Ks]
    rows = [x.float().cpu()] + [out.recon.float().clamp(-1, 1).cpu() for out in outs]
    labels = ["original"] + [f"K = {K}" for K in Ks]
    if getattr(outs[0], "recon_vae", None) is not None:                      # MergeTok: its continuous branch
        rows += [out.recon_vae.float().clamp(-1, 1).cpu() for out in outs]
        labels = ["original"] + [f"K = {K} discrete" for K in Ks] + [f"K = {K} continuous" for K in Ks]
    source = model.encode(x, K=Ks[0]).source.cpu()                            # (B, N) merged token of each token
    g = model.cfg.grid
    zoom = max(1, -(-64 // x.shape[-1]))                                     # 32 px: 2x
    rows = [F.interpolate(r, scale_factor=zoom, mode="nearest") if zoom > 1 else r for r in rows]
    rows.append(torch.stack([data_lib.overlay(img, data_lib.colorize_groups(s, (g, g), img.shape[-1]))
                             for img, s in zip(rows[0], source)]))
    labels.append(f"groups, K = {Ks[0]}")
    data_lib.save_image_grid(torch.cat(rows), path, nrow=x.shape[0], row_labels=labels)


def batch_usage(indices, d):
    """The codebook usage of one step: distinct codes among the global batch's merged tokens, over
    min(2^d, their number) (a batch of 16 x 64 tokens can use at most 1024 of the 2^18 codes, 0.4%: usage over 2^d
    would call every step a collapse). 1.0: every token its own code; a collapse is below 0.01."""
    used = CodebookUsage(2 ** d, indices.device)
    used.update(indices)
    used.gather()                                                             # all ranks' codes (a collective)
    tokens = indices.numel() * common.dist_info()[1]
    return used.used.sum().float() / min(2 ** d, tokens)


def _ignore_signals_in_worker(worker_id):
    """Loader workers leave SIGINT / SIGTERM to the training process, which stops cleanly after the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------------------------
# One step: the tokenizer, then the discriminator
# ----------------------------------------------------------------------------------------------------------------


def train_step(x, K, step, run):
    """One optimizer step of the tokenizer and (once the GAN is on) of the discriminator. Returns the loss terms.
    Two stop points (common.stop_point): before the forward and before the tokenizer's update."""
    common.stop_point()
    cfg, model, disc = run.cfg, run.model, run.disc
    gan_on = step >= cfg.disc_start
    align_view = align_target = None
    if run.teacher is not None:
        # Eq. (10): the teacher sees the resized image, the student a random resized crop with flip. The crop
        # draws depend on (seed, step, rank) only: exact on resume.
        g = torch.Generator().manual_seed((run.seed * 1_000_003 + step) * run.world + run.rank)
        align_view = data_lib.random_resized_crop(x, cfg.align_size, generator=g)   # on x's device, no copy
        with torch.no_grad():
            align_target = run.teacher(losses.dinov2_preprocess(x, size=cfg.align_size)).float()

    # ---- the tokenizer: the discriminator is frozen, so the generator's loss never reaches it ----------------
    disc.requires_grad_(False)
    with run.autocast():
        out, pred = run.forward(x, K, align_view)
        total, terms = losses.generator_loss(
            x, out, cfg, lpips=run.lpips, disc=disc if gan_on else None,
            align_pair=None if pred is None else (pred.float(), align_target),
            last_layer=model.decoder.last_layer_weight(), extra=run.extra)
    disc.requires_grad_(True)
    terms["batch_usage"] = batch_usage(out.enc.indices, run.tok_cfg.z_channels)
    common.check_finite(terms, step)
    run.opt_g.zero_grad(set_to_none=True)
    total.backward()
    common.stop_point()                                  # asked during the forward and backward: no update
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.opt_g.step()

    # ---- the discriminator on detached reconstructions: its loss never reaches the tokenizer -----------------
    if gan_on:
        with run.autocast():
            fakes = out.recon if run.extra is None else torch.cat([out.recon, run.extra.fakes(out)])
            d_total, d_terms, logits = losses.discriminator_loss(run.disc_ddp, x, fakes.detach().float(),
                                                                 run.lecam, cfg)
        common.check_finite(d_terms, step)
        run.opt_d.zero_grad(set_to_none=True)
        d_total.backward()
        torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
        run.opt_d.step()
        run.lecam.update(*logits)
        terms.update(d_terms)

    common.update_ema(run.ema, model, common.ema_decay(step, cfg.ema))
    return terms


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------


def setup(args, rank, world, device):
    """Configs, models, optimizers, data and (on --resume) the saved state, as one namespace `run`."""
    run = argparse.Namespace(rank=rank, world=world, seed=args.seed)
    run.cfg = cfg = build_train_config(args)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    run.tok_cfg = tok_cfg = build_tokenizer_config(args)
    run.out_dir = out_dir(args)
    run.amp = amp = args.amp or common.default_amp(device)
    run.autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16"
                    else contextlib.nullcontext)

    with torch.device("meta"):                                        # shapes only: count before building
        n_params = count_parameters(build_tokenizer(args.variant, config=tok_cfg))
    check_resources(args, cfg, tok_cfg, world, device, n_params + 2_770_000, amp)      # + the PatchGAN's 2.77M
    torch.manual_seed(args.seed)                                      # identical initial weights on every rank
    run.model = model = build_tokenizer(args.variant, config=tok_cfg).to(device)
    run.disc = losses.NLayerDiscriminator().to(device)
    torch.manual_seed(args.seed * world + rank)                       # per-rank seed (DiT)
    run.ema = copy.deepcopy(model).eval().requires_grad_(False)
    run.lecam = losses.LeCam().to(device)
    run.K_sampler = KeptTokenSampler(tok_cfg.K, tok_cfg.K_low, tok_cfg.K_high,
                                     kind="fixed" if args.K else tok_cfg.K_sampling, seed=args.seed)
    run.fixed_K = model.check_K(args.K) if args.K is not None else None
    if run.fixed_K is None:                                           # every K the sampler may draw, before step 1
        for K in run.K_sampler.candidates:
            try:
                model.check_K(K)
            except ValueError as e:
                raise ValueError(f"{e}; the kept-token sampler draws K from {run.K_sampler.candidates} (N="
                                 f"{tok_cfg.num_tokens} at {tok_cfg.image_size} px): pass --keep K or --keep-offsets "
                                 f"that fit") from None
    # MergeTok's posterior noise: its own generator (per rank), saved in the checkpoint, so that nothing else that
    # draws random numbers (a new DataLoader iterator at a resume) shifts it
    run.noise = torch.Generator(device).manual_seed(args.seed * world + rank)
    run.lpips, run.teacher = load_pretrained(args, model, run.ema, device)
    # The fourth variant's one hook: MergeTok's own terms and second reconstruction (mergetok.py), which the step
    # hands to losses.generator_loss, and its posterior noise; None and no noise for MergeVQ (G, G+R, R)
    run.extra = mergetok.MergeTokObjective(cfg, tok_cfg, run.teacher) if args.variant == "mergetok" else None

    ddp = dict(device_ids=[device.index]) if device.type == "cuda" else {}
    run.forward = Stage1Forward(model, noise=None if run.extra is None else run.noise)
    run.disc_ddp = run.disc
    if world > 1:
        # Without a teacher the alignment head takes no part in the loss.
        # MergeTok's DINOv2 projection is unused with --sem-weight 0.
        run.forward = DDP(run.forward, find_unused_parameters=run.teacher is None or run.extra is not None, **ddp)
        run.disc_ddp = DDP(run.disc, **ddp)
    run.opt_g = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    run.opt_d = torch.optim.AdamW(run.disc.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    run.dataset = data_lib.build_dataset(args.data, split="train", size=tok_cfg.image_size, crop_seed=args.seed)
    if len(run.dataset) < cfg.batch_size:
        raise ValueError(f"the dataset has {len(run.dataset)} images, fewer than one batch of {cfg.batch_size}")
    run.sampler = common.ResumableSampler(run.dataset, world, rank, seed=args.seed)
    run.steps_per_epoch = len(run.dataset) // cfg.batch_size
    run.total = cfg.steps if cfg.steps > 0 else cfg.epochs * run.steps_per_epoch
    run.workers = default_workers(cfg.workers) if args.workers is None else args.workers
    held_out = data_lib.build_dataset(args.data, split="val", size=tok_cfg.image_size)
    run.sample_batch = torch.stack([held_out[i][0] for i in range(min(8, len(held_out)))]).to(device)

    run.state = {"model": model, "ema": run.ema, "disc": run.disc, "lecam": run.lecam, "opt_g": run.opt_g,
                 "opt_d": run.opt_d}
    run.step = 0
    if args.resume:
        run.step = resume(args.resume, run, args.variant)
    return run


def start_log(args, run, device):
    """Rank 0: the output folder, config.json, a one-line summary; stale temporaries of a killed save removed."""
    common.prepare_out_dir(run.out_dir, {"args": vars(args), "train": dataclasses.asdict(run.cfg),
                                         "tokenizer": dataclasses.asdict(run.tok_cfg), "world_size": run.world},
                           replace=getattr(args, "overwrite_files", ()))
    tok_cfg = run.tok_cfg
    print(f"stage 1 | variant {args.variant} preset {args.preset} | {count_parameters(run.model) / 1e6:.2f}M "
          f"parameters | {run.world} process(es) on {device} | global batch {run.cfg.batch_size} | {run.total} steps "
          f"({run.steps_per_epoch} per epoch) | N={tok_cfg.num_tokens} tokens, target K={tok_cfg.K} | amp {run.amp} "
          f"| {run.workers} loader worker(s) per process | out {run.out_dir}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def train(args, rank, world, device):
    run = setup(args, rank, world, device)
    cfg, step = run.cfg, run.step
    stop_at = common.last_step(step, run.total, args.stop_at)                # before anything is written
    stopper = common.StopRequest(device)                                     # restored by run_distributed
    if rank == 0:
        start_log(args, run, device)
    ckpt_path, log_path = os.path.join(run.out_dir, "last.pt"), os.path.join(run.out_dir, "log.jsonl")
    bar = common.progress_bar(run.total, initial=step, desc=f"stage1-{args.variant}")
    t_start, images_seen, stopped_by, saved, head, terms = time.time(), 0, None, step, None, {}
    log = common.TrainingLog(log_path, bar)
    while step < stop_at and stopped_by is None:
        # ---- one epoch's loader, starting where the data order is (exact on resume, also mid-epoch) ----------
        epoch, in_epoch = divmod(step, run.steps_per_epoch)
        run.sampler.set_epoch(epoch)
        run.dataset.set_epoch(epoch)
        run.sampler.start = in_epoch * (cfg.batch_size // world)
        # its own generator: a new loader iterator draws its workers' base seed from it, not from the global RNG
        loader = DataLoader(run.dataset, batch_size=cfg.batch_size // world, sampler=run.sampler,
                            num_workers=run.workers, drop_last=True, pin_memory=device.type == "cuda",
                            worker_init_fn=_ignore_signals_in_worker,
                            generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            K = run.fixed_K or run.K_sampler.sample(step)                     # Appendix A.3
            lr = common.lr_at(step, run.total, cfg.lr, cfg.lr_schedule, cfg.lr_drops, cfg.warmup_steps)
            for opt in (run.opt_g, run.opt_d):
                for group in opt.param_groups:
                    group["lr"] = lr
            # None: a stop request ended the step before its update, which is dropped (the RNG, MergeTok's noise and
            # the discriminator's BatchNorm statistics back where it began)
            terms = stopper.step(train_step, x, K, step, run, generators=[run.noise], buffers_of=[run.disc])
            if terms is not None:
                step += 1
                images_seen += cfg.batch_size
                log.add(terms)
                bar.update(1)
                head = {"step": step, "lr": lr, "K": K}
            if terms is None or stopper.requested():
                stopped_by = stopper.signal
            last = step == stop_at or stopped_by is not None

            # ---- logging (all-reduced means), pictures, checkpoints ---------------------------------------------
            if step % cfg.log_every == 0 or last:
                log.write(head, {"images_per_s": round(images_seen / (time.time() - t_start), 2)})
            if (step % cfg.ckpt_every == 0 or last) and step != saved:      # the checkpoint first, then pictures
                payload = snapshot(run, step, args)
                if rank == 0:
                    common.save_checkpoint(ckpt_path, payload)
                saved = step
            if rank == 0 and cfg.sample_every and (step % cfg.sample_every == 0 or last) and stopped_by is None:
                write_samples(run.ema, run.sample_batch, os.path.join(run.out_dir, f"samples_{step:07d}.png"),
                              sample_Ks(run))
            if last:
                break
        del loader                                                            # ends its workers before the next
    bar.close()
    stopper.restore()
    report_skipped(run.dataset, args.data)
    if rank == 0:
        common.print_run_end(step, run.total, stopped_by, time.time() - t_start, images_seen, "images", ckpt_path,
                             interrupted=terms is None)


def report_skipped(dataset, data):
    """Unreadable images were replaced by the next file (data.ImageFolder); count each file once over all ranks.
    With --workers > 0 the skips happen in the workers' processes: their stderr warnings are the record."""
    skipped = sorted(set().union(*[set(s) for s in common.all_gather_objects(list(dataset.skipped))]))
    if common.is_main() and skipped:
        print(f"skipped {len(skipped)} unreadable image(s) in {data}: {', '.join(skipped[:5])}"
              + (" ..." if len(skipped) > 5 else ""), flush=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.deterministic:
            common.use_deterministic_algorithms()                     # before the first cuBLAS call
        common.run_distributed(lambda rank, world, device: train(args, rank, world, device), args.device,
                               check=lambda: check_args(args), prog="train_stage1.py")
    except common.InputError:                                         # its line is printed (rank 0)
        return 2
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad input or a diverged run: no traceback
        print(f"train_stage1.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("train_stage1.py: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
