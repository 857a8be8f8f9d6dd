"""The Source Recovery Model with and without the merged tokens' anchors, on one frozen tokenizer (Table 5's rows).

RandAR on merged tokens (Sec. 4.2) decodes through a predicted source, so its ceiling is the tokenizer's
reconstructions with that source. recovery.py gives every merged token its anchor, the first original position it
holds (merge.anchors): the anchor's position embedding is added to the token's cluster centre (Eq. (8)), a position
may only join a token anchored at or before it, and an anchor keeps its own token. Before, the model saw only a
slot embedding of ToMe's output order (`SlotRecovery` below rebuilds that design for this comparison).

This script freezes a stage-1 tokenizer, tokenizes training images once, trains both recovery models from scratch
on the same codes (the same steps, batches and learning rate), and measures each on held-out images at one K:

  accuracy         the fraction of the N positions whose merged token is predicted right; and of the positions that
                   are no anchor (an anchor's own token is given to the anchored model)
  PSNR             of the tokenizer's reconstructions decoded with the predicted source, beside the true source's

    python experiments/recovery_anchors.py --ckpt runs/stage1-g-tiny/last.pt

EMA weights; PSNR on [0, 1] as `evaluate.py recon`. One thread: about 4 minutes for the defaults.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as data_lib                                                      # noqa: E402
from merge import anchors                                                    # noqa: E402
from recovery import CrossAttentionBlock, SourceRecovery                     # noqa: E402
from tokenizer import load_tokenizer                                         # noqa: E402
from vit import Block                                                        # noqa: E402


class SlotRecovery(nn.Module):
    """The previous design: learnable queries (one per original position) attend to the merged tokens, each given a
    slot embedding of its index in ToMe's output order instead of a position; no anchor mask."""

    def __init__(self, num_tokens, z_dim, dim, depth, num_heads, ffn):
        super().__init__()
        self.embed = nn.Linear(z_dim, dim)
        self.slot_embed = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)       # slot k of the merged sequence
        self.queries = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.norm_in = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttentionBlock(dim, num_heads, ffn)
        self.blocks = nn.ModuleList([Block(dim, num_heads, ffn / dim) for _ in range(depth)])
        self.to_q, self.to_k = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False)

    def logits(self, z_q, anchors=None):
        B, K, _ = z_q.shape
        e = self.norm_in(self.embed(z_q) + self.slot_embed[:, :K])                    # (B, K, D)
        q = self.cross(self.queries.expand(B, -1, -1), e)                             # (B, N, D)
        for block in self.blocks:
            q = block(q)
        return (self.to_q(q) @ self.to_k(e).transpose(1, 2)).float() / math.sqrt(q.shape[-1])   # (B, N, K)

    def predict_source(self, z_q, anchors=None):
        return self.logits(z_q).argmax(-1)


def psnr(x, y):
    """Per-image PSNR (B,) in dB of images in [0, 1]."""
    return 10.0 * torch.log10(1.0 / (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3)))


@torch.no_grad()
def encode(tok, split, n, K, batch=100):
    """Images 0 .. n-1 of a split of the embedded shapes -> (images, z_q (n, K, d), source (n, N))."""
    ds = data_lib.ShapesDataset(split, size=tok.cfg.image_size, num_images=n)
    x = torch.stack([ds[i][0] for i in range(n)])
    zs, ss = zip(*((e.z_q, e.source) for e in (tok.encode(x[s:s + batch], K=K) for s in range(0, n, batch))))
    return x, torch.cat(zs), torch.cat(ss)


def train(model, z, source, steps, batch, lr, seed):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    K = z.shape[1]
    for step in range(steps):
        i = torch.randint(0, len(z), (batch,), generator=g)
        logits = model.logits(z[i], anchors(source[i], K))                             # (b, N, K)
        loss = F.cross_entropy(logits.flatten(0, 1), source[i].flatten())              # Eq. (9)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def measure(tok, model, x, z, source, K, batch=100):
    """(accuracy over all positions, over the positions that are no anchor, PSNR with the predicted source)."""
    right = right_free = free = 0.0
    p = 0.0
    for s in range(0, len(z), batch):
        zb, sb = z[s:s + batch], source[s:s + batch]
        a = anchors(sb, K)
        pred = model.predict_source(zb, a)
        not_anchor = torch.ones_like(sb, dtype=torch.bool).scatter(1, a, False)
        right += (pred == sb).float().sum().item()
        right_free += ((pred == sb) & not_anchor).float().sum().item()
        free += not_anchor.float().sum().item()
        rec = tok.decode_codes(zb.to(tok.decoder.conv_in.weight.dtype), pred).float().clamp(-1, 1)
        p += psnr((rec + 1) / 2, (x[s:s + batch] + 1) / 2).sum().item()
    return right / source.numel(), right_free / free, p / len(z)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/stage1-g-tiny/last.pt", help="a stage-1 checkpoint (its EMA weights)")
    p.add_argument("--keep", type=int, default=None, help="K (default: the tokenizer's target)")
    p.add_argument("--num-train", type=int, default=4000, help="training images the recovery models learn from")
    p.add_argument("--num-images", type=int, default=500, help="held-out images they are measured on")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        sys.exit(f"recovery_anchors: --ckpt {args.ckpt}: no such file")
    torch.set_num_threads(1)
    t0 = time.time()
    tok = load_tokenizer(args.ckpt, ema=True)
    K = tok.check_K(args.keep or tok.cfg.K)
    c = tok.cfg
    _, z_train, s_train = encode(tok, "train", args.num_train, K)
    x, z_val, s_val = encode(tok, "val", args.num_images, K)
    with torch.no_grad():
        rec = torch.cat([tok.decode_codes(z_val[s:s + 100], s_val[s:s + 100]).float().clamp(-1, 1)
                         for s in range(0, len(z_val), 100)])
    true_psnr = psnr((rec + 1) / 2, (x + 1) / 2).mean().item()
    rows = {"the tokenizer's own (anchors, trained in stage 1)": tok.recovery.eval()}
    for name, build in [("anchors (recovery.py), recovery-only", SourceRecovery),
                        ("slots, no anchors (the previous design), recovery-only", SlotRecovery)]:
        torch.manual_seed(args.seed)
        model = build(c.num_tokens, c.z_channels, c.rec_dim, c.rec_layers, c.rec_heads, c.rec_ffn)
        rows[name] = train(model, z_train, s_train, args.steps, args.batch_size, args.lr, args.seed)
    print(f"{args.ckpt}: K = {K} of N = {c.num_tokens}, {args.num_images} held-out images; recovery-only models: "
          f"{args.steps} steps of batch {args.batch_size} on {args.num_train} training images, lr {args.lr}")
    print(f"  PSNR with the true source: {true_psnr:.2f} dB")
    print(f"  {'Source Recovery Model':56s} {'accuracy':>9s} {'not anchors':>12s} {'PSNR, predicted':>16s}")
    for name, model in rows.items():
        acc, acc_free, pred_psnr = measure(tok, model, x, z_val, s_val, K)
        print(f"  {name:56s} {acc:9.3f} {acc_free:12.3f} {pred_psnr:13.2f} dB")
    print(f"  ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
