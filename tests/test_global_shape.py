"""The class decides a global shape, not a local texture: every generator draws the outline of its class.

tests/test_conditioning.py checks that a label reaches the logits; there the class owns codes of its own, so a model
follows it by emitting the right code in the right cell - a local decision. A shape is different: here every class
is drawn with the same two kinds of code, and only WHERE the ink goes tells the classes apart.

    a 6 x 6 grid; background cells hold the image's background code (one of 4), the cells of the class's shape its
    ink code (one of 4 others): a filled block, a plus, a triangle, the mirrored triangle.

LlamaGen and MergeAR generate the 36 codes in raster order (MergeAR's Eq. (12) mask and compacted cache act:
K < N groups, every code repeated). RandAR generates the image's merged tokens at their anchors: every horizontal
run of one code is one token anchored at its first cell, so the shape lives in the cells the position head draws
(Eq. (13)). A sample follows its label when it draws exactly its class's
shape; the null class has no label and can match the requested class only by chance (1 in 4).
"""
import pytest
import torch

from gpt import build_gpt, generate
from mergear import build_mergear, generate_mergear, mergear_loss, rep_from_codes
from merge import anchors
from randar import build_randar, generate_randar, randar_loss

G, CLASSES, KINDS = 6, 4, 4
ROWS = {"block": [(1, 4)] * 4, "plus": [(2, 3), (1, 4), (1, 4), (2, 3)],           # ink columns of rows 1-4
        "triangle": [(1, c) for c in range(1, 5)], "mirrored triangle": [(c, 4) for c in range(4, 0, -1)]}
SHAPES = torch.zeros(CLASSES, G * G, dtype=torch.bool)
for k, spans in enumerate(ROWS.values()):
    for r, (c0, c1) in enumerate(spans, start=1):
        SHAPES[k, r * G + c0: r * G + c1 + 1] = True
K = 14                          # runs per image: rows 0 and 5 one each, rows 1-4 three each (background, ink, background)


def draw_images(labels, g):
    """Raster codes (B, 36): background codes 0-3, ink codes 4-7, one of each per image; and the merge of each
    image, source (B, 36): one merged token per horizontal run of equal codes (K = 14 for every class)."""
    B = len(labels)
    bg, ink = torch.randint(0, KINDS, (B, 1), generator=g), KINDS + torch.randint(0, KINDS, (B, 1), generator=g)
    codes = torch.where(SHAPES[labels], ink, bg)                           # (B, 36)
    starts = torch.ones_like(codes, dtype=torch.bool)
    starts[:, 1:] = codes[:, 1:] != codes[:, :-1]                          # a run begins where the code changes
    starts[:, ::G] = True                                                  # ... or a row begins
    return codes, starts.long().cumsum(1) - 1                              # (B, 36), run number of every cell


def merged(codes, source):
    """The merged tokens of the toy: one per run, its code and its anchor (merge.anchors), (B, K) each."""
    a = anchors(source, K)
    return codes.gather(1, a), a


def train(kind, labels_of, steps=800, seed=0):
    torch.manual_seed(seed)
    args = dict(vocab_size=2 * KINDS, num_classes=CLASSES, block_size=G * G, class_cond="add")   # the CPU preset's
    if kind == "randar":
        model = build_randar("tiny", position_head=True, **args)
    elif kind == "mergear":
        model = build_mergear("tiny", merge_counts=(8,), **args)
    else:
        model = build_gpt("tiny", **args)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(steps):
        labels = labels_of(16, g)
        codes, source = draw_images(labels, g)
        if kind == "llamagen":
            loss = model(codes, labels, targets=codes).loss
        elif kind == "mergear":
            loss = mergear_loss(model, codes, labels, 8, rep_from_codes(codes))
        else:
            tokens, cells = merged(codes, source)
            loss = randar_loss(model, tokens, labels, cells, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def drawn_shape(kind, model, labels, seed):
    """The ink cells (B, 36) of samples for labels: where the raster codes are ink codes, or where RandAR's merged
    tokens put ink: each token fills its run, from its anchor to the next anchor or the row's end (the recovery
    this toy's merge implies)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "llamagen":
        return generate(model, labels, G * G, generator=g) >= KINDS
    if kind == "mergear":
        return generate_mergear(model, labels, 8, G * G, generator=g) >= KINDS
    tokens, cells = generate_randar(model, labels, K, 7, generator=g)      # 14 tokens in 7 parallel steps
    out = torch.zeros(len(labels), G * G, dtype=torch.bool)
    for b in range(len(labels)):
        runs = sorted(zip(cells[b].tolist(), tokens[b].tolist()))
        for i, (cell, code) in enumerate(runs):
            end = min(runs[i + 1][0] if i + 1 < len(runs) else G * G, (cell // G + 1) * G)
            out[b, cell:end] = code >= KINDS
    return out


@pytest.mark.parametrize("kind", ["llamagen", "mergear", "randar"])
def test_the_class_decides_the_shape_and_the_null_class_does_not(one_thread, kind):
    model = train(kind, lambda B, g: torch.randint(0, CLASSES, (B,), generator=g))
    wanted = torch.arange(CLASSES).repeat_interleave(12)
    follows = (drawn_shape(kind, model, wanted, 0) == SHAPES[wanted]).all(1).float().mean().item()
    null = (drawn_shape(kind, model, torch.full_like(wanted, CLASSES), 1) == SHAPES[wanted]).all(1)
    assert follows >= 0.75, f"{kind}: {follows:.2f} of the samples draw their class's shape"
    assert null.float().mean().item() <= 0.45, f"{kind}: {null.float().mean():.2f} of the null-class samples do"
