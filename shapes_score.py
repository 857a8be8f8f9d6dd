"""The shapes score: generation quality on the embedded shapes without pretrained weights (evaluate.py shapes).

FID and IS need Inception weights trained on ImageNet. On the embedded shapes (data.ShapesDataset, 10 classes) a
small CNN trained here in a minute or two plays Inception's two parts: (a) its accuracy on class-conditional
samples says how often a sample shows the class it was conditioned on (chance: 10%); (b) the Frechet distance
between its penultimate features of the samples and of held-out real images is FID's formula (Heusel et al.
2017, inception.frechet_distance) in a 96-d feature space. The numbers compare runs of this code with each
other; they are not ImageNet FIDs. Rows: the samples, a tokenizer's reconstructions of held-out images (the
ceiling a generator on its tokens can reach) and held-out real images (the floor of the distance).

    python evaluate.py shapes samples.npz --reconstructions runs/stage1-g-tiny/last.pt
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import data as data_lib
from common import load_strict, progress_bar, read_checkpoint, save_checkpoint
from inception import feature_stats, frechet_distance
from merge import anchors
from tokenizer import load_tokenizer

SHAPES_SIZE = 64                  # the images' size (the stage-1 tiny presets'); the classifier sees them at 32 px
CLASSIFIER_SIZE = 32              # every input, real or generated, is resized to this by the same (antialiased) resize
SHAPES_CLASSIFIER = dict(num_train=4000, epochs=6, batch_size=64, lr=3e-3, num_ref=500, width=24, style="simple")


class ShapesClassifier(nn.Module):
    """Four blocks of a 3x3 conv, BatchNorm, ReLU and 2x2 max pooling, 32 -> 2 px, global average pooling -> the
    feature (4 x width), a linear layer -> the class logits."""

    def __init__(self, num_classes=10, width=24):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x):
        """(B, 3, H, W) in [-1, 1] -> (features (B, 4 width), logits (B, num_classes)); resized to 32 px."""
        if x.shape[-2:] != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
            x = F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", align_corners=False,
                              antialias=True)
        f = self.features(x)
        return f, self.head(f)


def shapes_images(split, start, n, size=SHAPES_SIZE, style="simple"):
    """Embedded shapes start .. start + n - 1 of a split in a style (data.STYLES) -> (images (n, 3, size, size) in
    [-1, 1], labels (n,))."""
    ds = data_lib.ShapesDataset(split, size=size, num_images=start + n, style=style)
    xs, ys = zip(*(ds[i] for i in range(start, start + n)))
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def shapes_classify(model, images, batch_size=100):
    """images: (n, 3, H, W) in [-1, 1], or an indexable of (3, H, W) in [0, 1] (ImageArray, ImageFiles) ->
    (features float64 (n', F), predictions (n',), kept (n,) bool: False for unreadable files)."""
    model.eval()
    device = next(model.parameters()).device
    unit = not torch.is_tensor(images)                     # [0, 1] items, possibly None (unreadable)
    feats, preds, kept = [], [], []
    for s in range(0, len(images), batch_size):
        items = [images[i] for i in range(s, min(s + batch_size, len(images)))]
        kept += [x is not None for x in items]
        items = [x for x in items if x is not None]
        if not items:
            continue
        x = torch.stack(items).to(device, torch.float32)
        x = x * 2 - 1 if unit else x                                              # (b, 3, H, W) in [-1, 1]
        f, logits = model(x)
        feats.append(f.double().cpu())
        preds.append(logits.argmax(1).cpu())
    if not feats:
        raise ValueError("shapes score: none of the images could be read")
    return torch.cat(feats).numpy(), torch.cat(preds), torch.tensor(kept)


def train_shapes_classifier(seed=0, num_train=4000, epochs=6, batch_size=64, lr=3e-3, num_ref=500, width=24,
                            style="simple", device="cpu"):
    """Train the classifier on the first num_train training shapes of a style (AdamW, cosine schedule; deterministic
    for a seed, the global RNG untouched), then measure it on the first num_ref held-out shapes: their accuracy and
    the statistics (mu, sigma) of their features, the reference of the Frechet distance. Returns (model, info)."""
    x, y = shapes_images("train", 0, num_train, style=style)
    x = F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", align_corners=False,
                      antialias=True)                                             # resized once, not every epoch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapesClassifier(len(data_lib.CLASSES), width).to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = math.ceil(num_train / batch_size)
    total = epochs * steps
    bar = progress_bar(total, desc="shapes classifier")
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(num_train, generator=gen)
        for s in range(steps):
            for group in opt.param_groups:                                        # cosine to 0 over all steps
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * (epoch * steps + s) / total))
            idx = perm[s * batch_size:(s + 1) * batch_size]
            if len(idx) < 2:                                                      # BatchNorm needs two images
                continue
            loss = F.cross_entropy(model(x[idx].to(device))[1], y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
    bar.close()
    ref_x, ref_y = shapes_images("val", 0, num_ref, style=style)
    feats, preds, _ = shapes_classify(model, ref_x)
    mu, sigma = feature_stats(feats)
    info = {"seed": seed, "num_train": num_train, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "num_ref": num_ref, "width": width, "style": style, "val_accuracy": (preds == ref_y).float().mean().item(),
            "mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}
    return model.eval(), info


def load_shapes_classifier(path, seed=0, device="cpu", **settings):
    """The classifier cached at `path`, or (missing) one trained with `seed` and `settings` (SHAPES_CLASSIFIER
    by default) and saved there. Returns (model, info, trained: bool). A cached classifier of another style of the
    shapes is refused (one line)."""
    settings = {**SHAPES_CLASSIFIER, **settings}
    if os.path.exists(path):
        ckpt = read_checkpoint(path, "shapes classifier", required=("model", "info"))
        info = ckpt["info"]
        cached = info.get("style", "rich")                  # classifiers cached before the styles: the rich shapes
        if cached != settings["style"]:
            raise ValueError(f"shapes classifier {path} was trained on the {cached} shapes, not the "
                             f"{settings['style']} ones: pass another --classifier (or delete it to retrain)")
        model = ShapesClassifier(len(data_lib.CLASSES), info["width"])
        load_strict(model, ckpt["model"], f"shapes classifier {path}")
        return model.to(device).eval(), info, False
    model, info = train_shapes_classifier(seed, device=device, **settings)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint(path, {"model": model.state_dict(), "info": info})
    return model, info, True


def shapes_score(model, info, images, labels=None):
    """{num_images, accuracy, per_class, fd} of a set of images (see shapes_classify for the layouts): the fraction
    assigned to their label, overall and per class (a list over the classes, None for a class without images; both
    None without labels), and the Frechet distance of the features to the held-out reference."""
    feats, preds, kept = shapes_classify(model, images)
    mu, sigma = feature_stats(feats)
    fd = frechet_distance(mu, sigma, info["mu"].numpy(), info["sigma"].numpy())
    acc = per_class = None
    if labels is not None:
        y = torch.as_tensor(labels).long()[kept]
        right = preds == y
        acc = right.float().mean().item()
        per_class = [right[y == c].float().mean().item() if (y == c).any() else None
                     for c in range(len(data_lib.CLASSES))]
    return {"num_images": len(feats), "accuracy": acc, "per_class": per_class, "fd": fd}


@torch.no_grad()
def shapes_reconstructions(ckpt, start, n, K=None, device="cpu", batch_size=50, source="true", style="simple",
                           branch="discrete"):
    """A tokenizer's reconstructions (target K unless given) of held-out shapes start .. start + n - 1, decoded with
    the encoder's true source or the Source Recovery Model's predicted one from the codes at their anchors (the
    ceiling of RandAR's path, which generates codes and anchors but no source) -> (images (n, 3, S, S) in [-1, 1],
    labels (n,), K). branch "continuous": a MergeTok tokenizer's continuous branch instead of its codes, the merged
    posterior means decoded with the true source (decode_latent: the ceiling of a DiT on its latents)."""
    if source not in ("true", "predicted"):
        raise ValueError(f"source must be 'true' or 'predicted', got {source!r}")
    if branch not in ("discrete", "continuous"):
        raise ValueError(f"branch must be 'discrete' or 'continuous', got {branch!r}")
    tok = load_tokenizer(ckpt, ema=True, device=device)
    if branch == "continuous" and not hasattr(tok, "decode_latent"):
        raise ValueError(f"--branch continuous: {ckpt} is a {tok.cfg.variant} tokenizer, which has no continuous "
                         f"branch (only --variant mergetok has one)")
    if branch == "continuous" and source != "true":
        raise ValueError("--branch continuous decodes with the true source: the Source Recovery Model reads discrete "
                         "codes only")
    K = tok.check_K(tok.cfg.K if K is None else K)
    x, y = shapes_images("val", start, n, size=tok.cfg.image_size, style=style)
    out = []
    for s in range(0, n, batch_size):
        enc = tok.encode(x[s:s + batch_size].to(device), K=K)                     # indices (b, K), source (b, N)
        given = enc.source if source == "true" else None                         # None: predicted from the codes
        rec = (tok.decode_latent(enc.latent, enc.source) if branch == "continuous" else
               tok.decode(enc.indices, given, anchors(enc.source, K)))            # (b, 3, S, S)
        out.append(rec.float().clamp(-1, 1).cpu())
    return torch.cat(out), y, K
