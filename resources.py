"""Memory estimates of the two training scripts: a run that cannot fit stops, with one line, before it starts.

train_stage1.py calls check_stage1 and train_stage2.py check_stage2 once their models are counted and before anything
is built on the device; each prints its estimate by part on rank 0 and stops the run (--run-anyway starts it
regardless) when the estimate exceeds common.memory_available.

Where the constants come from. Each counts what autograd keeps for backward: the distinct storages that
torch.autograd.graph.saved_tensors_hooks sees during one training forward on the CPU, taken as the difference between
two batch sizes, so that the weights and anything else per step, not per sample, cancel. bench/bench_memory.py
measures them again and prints each beside the constant:

  BF16_ACTIVATION_FACTOR       stage 1: the paper's G under bf16 autocast over G in float32 (per input pixel).
  MERGETOK_ACTIVATION_FACTOR   stage 1: MergeTok (its decoder runs on both branches) over G, float32.
  BLOCK_BYTES_PER_WIDTH        stage 2: one transformer block at GPT-L's width, per unit of width D and position
                               (1 and 2 blocks, 2 and 4 sequences, 64 and 144 positions alike), per --amp.
  HEAD_BYTES_PER_LOGIT         stage 2: the head with its cross-entropy, per predicted position and logit: plain (one
                               logit per code) and factorized (its pre and post logits, beside its two intra-token
                               blocks on two slots, counted as 4 blocks' worth of width).

ACTIVATION_BYTES_PER_PIXEL, the float32 G figure the two factors scale, is older: it was set at commit 4659e79 from a
CPU measurement whose method that commit does not record, and bench/bench_memory.py's count of G's saved tensors
comes out higher. It is kept unchanged, so that every estimate stays what it was, until it is measured again.
The figures behind each constant, and the command's output: docs/memory.md.

    python resources.py      # the estimates of the paper presets' runs per GPU (8 GPUs), and of the CPU presets
"""
import common
from mergetok import collision_memory

# ----------------------------------------------------------------------------------------------------------------
# Stage 1: the tokenizer (train_stage1.py)
# ----------------------------------------------------------------------------------------------------------------

ACTIVATION_BYTES_PER_PIXEL = 32e3
BF16_ACTIVATION_FACTOR = 0.52
MERGETOK_ACTIVATION_FACTOR = 1.62


def stage1_memory(variant, tok_cfg, local_batch, amp, n_params):
    """Bytes one process needs, by part: "weights" (weights, gradients, Adam moments and EMA in fp32: 20 bytes per
    parameter), "activations" (what the forward keeps for backward, scaled from the measured G figure above) and,
    for MergeTok, "collision" (its code-collision blocks, mergetok.collision_memory)."""
    per_pixel = ACTIVATION_BYTES_PER_PIXEL * tok_cfg.ch / 64 * (BF16_ACTIVATION_FACTOR if amp == "bf16" else 1.0)
    parts = {"weights": 5 * 4 * n_params, "activations": local_batch * tok_cfg.image_size ** 2 * per_pixel}
    if variant == "mergetok":
        parts["activations"] *= MERGETOK_ACTIVATION_FACTOR
        parts["collision"] = collision_memory(local_batch, tok_cfg.num_tokens, tok_cfg.z_channels)
    return parts


def check_stage1(args, cfg, tok_cfg, world, device, n_params, amp):
    """Print the memory estimate of a run (stage1_memory); stop with one line when there is no GPU for the paper
    preset or the estimate exceeds what the machine has. args: train_stage1's (variant, preset, run_anyway); cfg
    its TrainConfig."""
    local_batch = cfg.batch_size // world
    parts = stage1_memory(args.variant, tok_cfg, local_batch, amp, n_params)
    need, have = sum(parts.values()), common.memory_available(device)
    names = {"weights": "weights, gradients, Adam and EMA (fp32)",
             "activations": f"activations (batch {local_batch} of {tok_cfg.image_size} px, {amp})",
             "collision": "MergeTok's code-collision blocks"}
    terms = " + ".join(f"{common.format_bytes(v)} {names[k]}" for k, v in parts.items())
    common.rank0_print(f"memory estimate per process: {terms} = {common.format_bytes(need)}; {device} has "
                       f"{common.format_bytes(have)}")
    problems = []
    if device.type != "cuda" and args.preset == "paper":
        problems.append("no GPU: the paper preset trains for weeks even on 8 GPUs")
    if need > have:
        problems.append(f"it needs about {need / 2**30:.1f} GB per process (batch {local_batch} of "
                        f"{tok_cfg.image_size} px), this machine has {have / 2**30:.1f} GB for each")
    if problems and not args.run_anyway:
        raise ValueError("; ".join(problems) + ". On a CPU: torchrun --nproc_per_node=2 train_stage1.py --variant "
                         f"{args.variant} --preset tiny (--run-anyway starts this run regardless)")


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: the generators (train_stage2.py train)
# ----------------------------------------------------------------------------------------------------------------

BLOCK_BYTES_PER_WIDTH = {"bf16": 60, "none": 100}
HEAD_BYTES_PER_LOGIT = {False: 5, True: 10}                  # plain, factorized


def stage2_positions(kind, tokens, N, K):
    """(positions the main stack runs on, positions the heads predict) of one training sequence."""
    if kind == "randar":
        L = N if tokens == "grid" else K
        return 1 + 2 * L, L                                      # [C, P_0, X_0, ..., P_{L-1}, X_{L-1}]
    return (N + 1 if kind == "mergear" else N), N                # [C, M, x_0 .. x_{N-2}] or [C, x_0 .. x_{N-2}]


def stage2_memory(c, kind, T, predicted, micro_batch, amp, world, checkpointed, n_params):
    """Bytes one process needs to train, by part: "weights" (fp32 weights, gradients and the two AdamW moments;
    bf16 copies under autocast; DDP's gradient buckets), "activations" (what one micro-batch keeps for backward:
    the blocks, BLOCK_BYTES_PER_WIDTH, or with activation checkpointing each block's float32 input and one block
    recomputed; the heads, HEAD_BYTES_PER_LOGIT) and for MergeAR "mask" (the (B, T, T) boolean mask, and per kept
    block the 2-byte additive bias a GPU attention kernel makes of it and keeps for backward). c: the GPTConfig."""
    D, w = c.dim, BLOCK_BYTES_PER_WIDTH[amp]
    block = T * w * D                                                      # one block, one sequence
    kept_blocks = 1 if checkpointed else c.n_layer
    if c.factorized:
        logits = 2 ** c.pre_bits + c.vocab_size // 2 ** c.pre_bits        # pre and post logits per position
        head = predicted * (4 * w * D + HEAD_BYTES_PER_LOGIT[True] * logits)
    else:
        head = predicted * HEAD_BYTES_PER_LOGIT[False] * c.vocab_size
    inputs = T * 4 * D * c.n_layer if checkpointed else 0                 # each block's input, float32
    parts = {"weights": n_params * (16 + (2 if amp == "bf16" else 0) + (4 if world > 1 else 0)),
             "activations": micro_batch * (kept_blocks * block + inputs + head)}
    if kind == "mergear":
        parts["mask"] = micro_batch * T * T * (1 + 2 * kept_blocks)
    return parts


def check_stage2(args, run, device):
    """Print the memory estimate of the run (stage2_memory) on rank 0; stop with one line, naming a --grad-accum
    that fits, when it exceeds what the device has (--run-anyway starts regardless). args: train_stage2's train
    arguments; run: its setup (table, Ks, K, model, cfg, world, grad_accum, amp)."""
    N, c = run.table["source"][int(run.Ks[0])].shape[1], run.model.cfg
    T, predicted = stage2_positions(args.model, args.tokens, N, run.K)
    local = run.cfg.batch_size // run.world
    n_params = sum(p.numel() for p in run.model.parameters())

    def need(A, checkpointed):
        return stage2_memory(c, args.model, T, predicted, local // A, run.amp, run.world, checkpointed, n_params)

    parts, have = need(run.grad_accum, args.checkpoint_activations), common.memory_available(device)
    names = {"weights": "weights, gradients and AdamW", "mask": "MergeAR's masks",
             "activations": f"activations ({local // run.grad_accum} sequences of {T} positions per micro-batch, "
                            f"{run.amp}{', checkpointed' if args.checkpoint_activations else ''})"}
    terms = " + ".join(f"{common.format_bytes(v)} {names[k]}" for k, v in parts.items())
    common.rank0_print(f"memory estimate per process: {terms} = {common.format_bytes(sum(parts.values()))}; {device} "
                       f"has {common.format_bytes(have)}")
    if sum(parts.values()) <= have or args.run_anyway:
        return
    fits = [A for A in range(run.grad_accum, local + 1) if local % A == 0
            and sum(need(A, args.checkpoint_activations).values()) <= have]
    hint = (f"--grad-accum {fits[0]} (micro-batches of {local // fits[0]}, the same global batch)" if fits else
            "a smaller --batch-size or GPT")
    if not args.checkpoint_activations and sum(need(run.grad_accum, True).values()) <= have:
        hint += " or --checkpoint-activations"
    raise ValueError(f"the run needs about {common.format_bytes(sum(parts.values()))} per process, {device} has "
                     f"{common.format_bytes(have)}: use {hint} (--run-anyway starts it regardless)")


# ----------------------------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import torch

    from gpt import build_gpt
    from tokenizer import build_tokenizer, get_config

    def count(model):
        return sum(p.numel() for p in model.parameters())

    for preset, batch in [("paper", 256 // 8), ("tiny", 16)]:
        for variant in ["g", "gr", "r", "mergetok"]:
            tok_cfg = get_config(variant, preset)
            with torch.device("meta"):
                n = count(build_tokenizer(variant, config=tok_cfg)) + 2_770_000     # + the PatchGAN
            for amp in ["bf16", "none"]:
                parts = stage1_memory(variant, tok_cfg, batch, amp, n)
                print(f"stage 1 {preset:5s} {variant:8s} batch {batch} {amp:4s}: "
                      + ", ".join(f"{k} {common.format_bytes(v)}" for k, v in parts.items())
                      + f" = {common.format_bytes(sum(parts.values()))}")
    N = get_config("g").num_tokens                                # the paper's G: N = 1024 tokens of 18 bits
    with torch.device("meta"):
        model = build_gpt("L", vocab_size=2 ** 18, factorized=True, block_size=N)
    for kind in ["llamagen", "mergear"]:
        T, predicted = stage2_positions(kind, "grid", N, 256)
        parts = stage2_memory(model.cfg, kind, T, predicted, 1024 // 8, "bf16", 8, False, count(model))
        print(f"stage 2 paper GPT-L {kind:8s} batch {1024 // 8} bf16: "
              + ", ".join(f"{k} {common.format_bytes(v)}" for k, v in parts.items())
              + f" = {common.format_bytes(sum(parts.values()))}")
