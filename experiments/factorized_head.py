"""Does the factorized 2^18 head learn a class that lives only in the post sub-token? (docs/factorized_head.md)

The toy: an 8 x 8 grid of 18-bit codes; every cell outside the central 4 x 4 block draws one of 16
background codes shared by all cells, every cell of the block one of 4 codes of the conditioning class (10 classes).
The class codes differ only in the post sub-token (lfq.split_index: pre = low 6 bits, post = high 12 bits): code j
of class c is join_index(pre_j, post_{c,j}), the 4 pre values the same for every class. The plain-head control
takes 56 distinct codes of a 256-code vocabulary in the same layout. GPT `tiny` (block_size 64), AdamW lr 1e-3
(weight decay 0.05 on matrices), batch 16, gradient clipping 1.0, 600 steps; then 20 samples per class at cfg 1
and 3. Class accuracy: the fraction of samples whose block holds a majority (> 8 of 16) of their class's codes.

Heads: plain (256 codes), ours (gpt.py's default, slot 1 of the intra-token blocks = h_t + pre_emb(pre_t)) and
release (intra_post_input="pre": slot 1 = pre_emb(pre_t), the MergeVQ release's and Open-MAGVIT2's).

--diagnose prints, every --every steps of LlamaGen with a factorized head, on 64 held-out sequences in eval mode:
  post_cls / post_bg   cross-entropy of the post sub-token on the class block / the background (nats; on the
                       block ln 10 = 2.30 is the marginal over the classes, 0 knows the class)
  pre_cls / pre_bg     the same for the pre sub-token (ln 4 and ln 16 are its best without the future)
  grad_h               mean norm, per block cell, of d(post_cls)/d h_t, the gradient the post head passes to the
                       transformer's state h_t
  dlabel               mean over sequences of max |delta log p(post)| at the block's first cell when the label is
                       changed (c -> c + 1), codes kept
  dstate               the same over the block when h_t is swapped between sequences, pre_t kept

    python experiments/factorized_head.py
    python experiments/factorized_head.py --kinds llamagen --heads release,ours --diagnose --every 100
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt import build_gpt, generate  # noqa: E402
from lfq import join_index, split_index  # noqa: E402
from mergear import build_mergear, generate_mergear, mergear_loss, rep_from_codes  # noqa: E402

G, CLASSES, BACKGROUND = 8, 10, 16
BLOCK = torch.tensor([r * G + c for r in range(2, 6) for c in range(2, 6)])   # the central 4 x 4, raster order


def codebook(head, seed=0):
    """(background (16,), class codes (10, 4), vocabulary size) of the toy."""
    g = torch.Generator().manual_seed(seed)
    if head == "plain":
        codes = torch.randperm(256, generator=g)[: BACKGROUND + 4 * CLASSES]
        return codes[:BACKGROUND], codes[BACKGROUND:].view(CLASSES, 4), 256
    background = torch.randperm(2 ** 18, generator=g)[:BACKGROUND]
    pre = torch.randperm(64, generator=g)[:4]                                # shared by every class
    post = torch.randperm(4096, generator=g)[: 4 * CLASSES].view(CLASSES, 4)   # the class lives here only
    return background, join_index(pre.expand(CLASSES, 4), post), 2 ** 18


def draw(background, class_codes, B, g):
    """B sequences (B, 64) and their labels (B,)."""
    labels = torch.randint(0, CLASSES, (B,), generator=g)
    codes = background[torch.randint(0, BACKGROUND, (B, G * G), generator=g)]   # (B, 64)
    pick = torch.randint(0, 4, (B, len(BLOCK)), generator=g)                    # (B, 16)
    codes[:, BLOCK] = class_codes[labels[:, None], pick]
    return codes, labels


def build(kind, head, vocab):
    extra = {"intra_post_input": "pre"} if head == "release" else {}
    args = dict(vocab_size=vocab, factorized=head != "plain", num_classes=CLASSES, block_size=G * G, **extra)
    if kind == "mergear":
        return build_mergear("tiny", merge_counts=(G * G,), **args)
    return build_gpt("tiny", **args)


def loss_of(kind, model, codes, labels):
    if kind == "mergear":
        return mergear_loss(model, codes, labels, G * G, rep_from_codes(codes))
    return model(codes, labels, targets=codes).loss


def diagnose(model, background, class_codes):
    """The post head's losses, the gradient it passes to the state, and how much its logits move with the label and
    with the state (LlamaGen, factorized head); see the module docstring."""
    was_training = model.training
    model.eval()
    codes, labels = draw(background, class_codes, 64, torch.Generator().manual_seed(99))
    pre, post = split_index(codes, model.cfg.pre_bits)

    def state(lab):
        cond = model.cls_embedding(lab, train=False)                         # (B, 1, D)
        return model.run_layers(torch.cat([cond, model.embed_codes(codes[:, :-1])], dim=1))   # (B, 64, D)

    h = state(labels).detach().requires_grad_(True)
    l_pre, l_post = model.intra_logits(h, pre)
    ce_post = F.cross_entropy(l_post.flatten(0, 1), post.flatten(), reduction="none").view(64, -1)   # (B, 64)
    ce_pre = F.cross_entropy(l_pre.flatten(0, 1), pre.flatten(), reduction="none").view(64, -1)
    block = torch.zeros(G * G, dtype=torch.bool)
    block[BLOCK] = True
    (grad_h,) = torch.autograd.grad(ce_post[:, block].mean(), h)
    with torch.no_grad():
        logp = l_post.log_softmax(-1)
        other = model.intra_logits(state((labels + 1) % CLASSES), pre)[1].log_softmax(-1)
        swapped = model.intra_logits(h.roll(1, dims=0), pre)[1].log_softmax(-1)
        first = BLOCK[0]
        out = dict(post_cls=ce_post[:, block].mean(), post_bg=ce_post[:, ~block].mean(),
                   pre_cls=ce_pre[:, block].mean(), pre_bg=ce_pre[:, ~block].mean(),
                   grad_h=grad_h[:, block].norm(dim=-1).mean(),
                   dlabel=(logp - other)[:, first].abs().amax(-1).mean(),
                   dstate=(logp - swapped)[:, block].abs().amax(-1).mean())
    model.train(was_training)
    return {k: v.item() for k, v in out.items()}


def train(kind, head, steps, seed=0, every=0):
    torch.manual_seed(seed)
    background, class_codes, vocab = codebook(head, seed)
    model = build(kind, head, vocab)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    for step in range(steps + 1):
        if every and step % every == 0:
            d = diagnose(model, background, class_codes)
            print(f"  {head} step {step:4d}  " + "  ".join(f"{k} {v:.3g}" for k, v in d.items()), flush=True)
        if step == steps:
            break
        codes, labels = draw(background, class_codes, 16, g)
        loss = loss_of(kind, model, codes, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval(), class_codes


def class_accuracy(kind, model, class_codes, cfg_scale, per_class=20, seed=0):
    wanted = torch.arange(CLASSES).repeat_interleave(per_class)             # (200,)
    g = torch.Generator().manual_seed(seed)
    if kind == "mergear":
        codes = generate_mergear(model, wanted, G * G, G * G, cfg_scale=cfg_scale, generator=g)
    else:
        codes = generate(model, wanted, G * G, cfg_scale=cfg_scale, generator=g)
    hits = (codes[:, BLOCK, None] == class_codes[wanted][:, None, :]).any(-1)   # (200, 16): a code of the class
    return (hits.sum(1) > len(BLOCK) // 2).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", default="llamagen,mergear", help="comma-separated: llamagen, mergear")
    p.add_argument("--heads", default="plain,release,ours", help="comma-separated: plain, release, ours")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--diagnose", action="store_true", help="print the post head's diagnosis (LlamaGen, factorized)")
    p.add_argument("--every", type=int, default=100, help="steps between diagnoses")
    args = p.parse_args()
    kinds, heads = args.kinds.split(","), args.heads.split(",")
    bad = [k for k in kinds if k not in ("llamagen", "mergear")] + [h for h in heads if h not in
                                                                     ("plain", "release", "ours")]
    if bad:
        sys.exit(f"factorized_head.py: unknown kind or head {bad[0]!r} (kinds: llamagen, mergear; heads: plain, "
                 f"release, ours)")
    torch.set_num_threads(1)                       # tiny ops: a second thread costs more than it saves
    for kind in kinds:
        for head in heads:
            start = time.time()
            every = args.every if args.diagnose and kind == "llamagen" and head != "plain" else 0
            model, class_codes = train(kind, head, args.steps, args.seed, every)
            acc = [class_accuracy(kind, model, class_codes, s) for s in (1.0, 3.0)]
            print(f"{kind:8s}  {head:7s}  class accuracy cfg 1: {acc[0]:.2f}  cfg 3: {acc[1]:.2f}  "
                  f"({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
