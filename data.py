"""Data for stage 1: the embedded procedural images, an ImageFolder reader, batch crops and picture helpers.

- ShapesDataset: class-labelled images of shapes over varied backgrounds, generated on the fly and deterministic
  from (seed, split, index), at any resolution; nothing to download. The default when no --data is given.
- ImageFolder: the ImageNet layout root/class_x/*.jpg with the paper's transforms (Appendix A.1: resize the shorter
  side + random crop + horizontal flip for training, resize + centre crop for evaluation). Unreadable images are
  skipped and counted, never a crash.
- build_dataset: --data None -> ShapesDataset, a folder -> ImageFolder (train / val rule in its docstring).
- random_resized_crop, resize_crop: per-sample crops of a batch (the student's view for the global alignment,
  Eq. 10) and resize + centre crop.
- save_image_grid, colorize_groups, overlay: the pictures the training script writes (reconstructions, and which
  tokens were merged together, Sec. 3.1).

Only numpy, PIL and torch (no torchvision). Images are float tensors (3, H, W) in [-1, 1].

    python data.py            # writes shapes.png (a grid of the embedded images) and prints the generation speed
"""
import hashlib
import math
import os
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def to_rgb8(img):
    """Any PIL image -> 8-bit RGB. 16-bit and 32-bit greyscale ("I;16", "I") are rescaled from their full range
    (PIL's own convert("RGB") clips them at 255, so a 16-bit PNG would come out white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.clip(np.round(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


def pil_to_tensor(img):
    """PIL RGB image -> (3, H, W) float32 tensor in [-1, 1]."""
    arr = np.array(img, dtype=np.uint8)                                     # (H, W, 3), a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


def tensor_to_uint8(x):
    """(..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3) numpy array (channels last, for PIL)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()                                        # (..., H, W, 3)


# ----------------------------------------------------------------------------------------------------------------
# The embedded procedural dataset
# ----------------------------------------------------------------------------------------------------------------

CLASSES = ["circle", "square", "triangle", "ring", "cross", "star", "stripes", "checker", "gradient blob",
           "ellipse"]
STYLES = ("simple", "rich")
# simple: one shape in one of four colours on a dark background. Why so few colours: a code of the tokenizer
# describes a colour pair and an edge together, so every colour pair multiplies the codes a small generator must
# learn to place; with random or 10 colours it drew blobs (docs/stage2_cpu.md, "How the scale was chosen").
SIMPLE_COLORS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200)]
SIMPLE_BACKGROUND = (30, 30, 30)
BACKGROUNDS = ["flat", "linear gradient", "smooth noise", "stripes"]          # rich
SUPERSAMPLE = 2          # shapes are drawn at SUPERSAMPLE x the output size, then downsampled: anti-aliased edges


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural class-labelled RGB images; nothing is stored or downloaded.

    Item i holds one large labelled shape of class i % num_classes (CLASSES[label]: circle, square, ..., each
    flat-filled except the gradient blob) at a random position, scale and rotation, in one of two styles:
      simple (the default): in one of four colours (SIMPLE_COLORS; the checker and the blob use two of them) on a
        flat dark background. The classes differ by shape only, and a small generator can learn them (the CPU
        demo's images: docs/stage2_cpu.md).
      rich: a background of random colours (flat, linear gradient, low-frequency noise or soft stripes), 0-2 small
        distractor shapes of random kinds behind the labelled one, every colour random: flat regions (something for
        token merging to merge), edges and texture. Harder for a tokenizer and far harder for a small generator.

    Deterministic from (seed, split, index): each item draws from its own numpy Generator seeded by a hash of the
    three, so items do not depend on the order of access or on DataLoader workers, and "val" is a held-out split
    (other seeds). Everything is drawn in continuous unit coordinates, so size=32 and size=256 show the same scene.
    The length is virtual (default 20000 train / 1000 val images).

    [i] -> (image (3, size, size) float in [-1, 1], label int)
    """

    classes = CLASSES

    def __init__(self, split="train", size=64, num_images=None, num_classes=10, seed=0, style="simple"):
        if split not in ("train", "val"):
            raise ValueError(f"ShapesDataset: split must be 'train' or 'val', got {split!r}")
        if not 1 <= num_classes <= len(CLASSES):
            raise ValueError(f"ShapesDataset: num_classes must be in 1..{len(CLASSES)}, got {num_classes}")
        if int(size) < 8:
            raise ValueError(f"ShapesDataset: size must be >= 8 pixels, got {size}")
        if num_images is None:
            num_images = 20000 if split == "train" else 1000
        if int(num_images) < 1:
            raise ValueError(f"ShapesDataset: num_images must be >= 1, got {num_images}")
        if style not in STYLES:
            raise ValueError(f"ShapesDataset: style must be one of {', '.join(STYLES)}, got {style!r}")
        self.split, self.size, self.num_classes, self.seed, self.style = split, int(size), num_classes, seed, style
        self.num_images = int(num_images)
        self.classes = CLASSES[:num_classes]

    # Same interface as ImageFolder: procedural images are never unreadable.
    skipped = property(lambda self: [])
    num_skipped = property(lambda self: 0)

    def set_epoch(self, epoch):
        """Same interface as ImageFolder: the images are fixed, every epoch sees the same ones."""

    def __len__(self):
        return self.num_images

    def _rng(self, index):
        key = f"shapes/{self.seed}/{self.split}/{index}".encode()
        return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))

    def __getitem__(self, index):
        if not 0 <= index < self.num_images:
            raise IndexError(f"ShapesDataset index {index} out of range [0, {self.num_images})")
        rng = self._rng(index)
        label = index % self.num_classes                                    # exact balance over any K items
        S = SUPERSAMPLE * self.size
        # pixel centres in unit coordinates [0, 1]: the same continuous scene at every resolution
        u = (np.arange(S, dtype=np.float32) + 0.5) / S                      # (S,)
        if self.style == "simple":
            mean_color = np.array(SIMPLE_BACKGROUND, np.float32)
            img = Image.new("RGB", (S, S), SIMPLE_BACKGROUND)
            center, scale = rng.uniform(0.35, 0.65, 2), rng.uniform(0.30, 0.42)
        else:
            background, mean_color = self._background(rng, u)
            img = Image.fromarray(background)
            for _ in range(rng.integers(0, 3)):                             # distractors first: behind the label
                kind = CLASSES[rng.integers(0, self.num_classes)]
                center, scale = rng.uniform(0.1, 0.9, 2), rng.uniform(0.10, 0.20)
                img = self._shape(img, rng, kind, center, scale, u, mean_color)
            center, scale = rng.uniform(0.3, 0.7, 2), rng.uniform(0.25, 0.40)
        img = self._shape(img, rng, CLASSES[label], center, scale, u, mean_color)
        img = img.resize((self.size, self.size), Image.BILINEAR)            # antialiased (box-like) downsampling
        return pil_to_tensor(img), label

    # ---- colours and backgrounds -------------------------------------------------------------------------------

    def _color(self, rng, avoid=None, min_dist=110.0):
        """A random RGB colour at least `min_dist` away from `avoid` (so the shape stands out): one of SIMPLE_COLORS,
        or (rich) any colour, when one of 8 draws is that far."""
        if self.style == "simple":
            choices = [c for c in SIMPLE_COLORS if avoid is None or np.linalg.norm(np.array(c) - avoid) >= min_dist]
            return choices[rng.integers(0, len(choices))]
        for _ in range(8):
            c = rng.integers(0, 256, 3)
            if avoid is None or np.linalg.norm(c - avoid) >= min_dist:
                break
        return tuple(int(v) for v in c)

    def _background(self, rng, u):
        """(S, S, 3) uint8 background (rich) and its mean colour. Field t(x, y) in [0, 1] mixes two nearby colours."""
        kind = BACKGROUNDS[rng.integers(0, len(BACKGROUNDS))]
        c0 = rng.integers(0, 256, 3).astype(np.float32)
        c1 = (c0 + rng.uniform(0.3, 0.7) * (rng.integers(0, 256, 3) - c0)).astype(np.float32)  # softer contrast
        x, y = u[None, :], u[:, None]                                       # (1, S), (S, 1)
        if kind == "flat":
            return np.broadcast_to(c0.astype(np.uint8), (len(u), len(u), 3)).copy(), c0
        if kind == "linear gradient":
            a = rng.uniform(0, 2 * np.pi)
            t = np.cos(a) * (x - 0.5) + np.sin(a) * (y - 0.5)               # (S, S) in [-0.71, 0.71]
            t = t / 1.42 + 0.5
        elif kind == "smooth noise":                                        # 4 random waves of 1-3 cycles / image
            t = np.zeros((len(u), len(u)), np.float32)
            for _ in range(4):
                fx, fy = rng.uniform(-3, 3, 2)
                phase = rng.uniform(0, 2 * np.pi)
                # cos(a + b) = cos a cos b - sin a sin b: two outer products instead of an (S, S) cosine
                ax, by = 2 * np.pi * fx * x + phase, 2 * np.pi * fy * y     # (1, S), (S, 1)
                t += np.cos(by) * np.cos(ax) - np.sin(by) * np.sin(ax)      # (S, S)
            t = (t - t.min()) / (np.ptp(t) + 1e-6)
        else:                                                               # stripes
            a, f = rng.uniform(0, np.pi), rng.integers(3, 9)
            t = ((np.cos(a) * x + np.sin(a) * y) * f % 1.0 < 0.5).astype(np.float32)  # (S, S)
        img = c0 + (c1 - c0) * t[..., None]                                 # (S, S, 3)
        return img.clip(0, 255).astype(np.uint8), (c0 + c1) / 2

    # ---- shapes ------------------------------------------------------------------------------------------------

    def _shape(self, img, rng, kind, center, scale, u, avoid):
        """Draw one shape of radius `scale` (unit coordinates) at `center` with a random rotation; returns img."""
        S = img.size[0]
        cx, cy = center * S
        r, rot = scale * S, rng.uniform(0, 2 * np.pi)
        color = self._color(rng, avoid)
        cos, sin = math.cos(rot), math.sin(rot)
        draw = ImageDraw.Draw(img)

        def poly(points, fill=color, target=draw):                          # rotate unit points, place, draw
            target.polygon([(cx + r * (px * cos - py * sin), cy + r * (px * sin + py * cos)) for px, py in points],
                           fill=fill)

        if kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif kind == "ellipse":
            n = 48
            poly([(math.cos(2 * math.pi * k / n), 0.5 * math.sin(2 * math.pi * k / n)) for k in range(n)])
        elif kind == "ring":                                                # a mask keeps the hole exact at any size
            mask = Image.new("L", img.size, 0)
            md = ImageDraw.Draw(mask)
            md.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            ri = 0.62 * r
            md.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
            img.paste(color, (0, 0, S, S), mask)
        elif kind == "square":
            poly([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
        elif kind == "triangle":
            poly([(0, -1), (0.87, 0.5), (-0.87, 0.5)])
        elif kind == "cross":
            poly([(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)])
            poly([(-0.28, -1), (0.28, -1), (0.28, 1), (-0.28, 1)])
        elif kind == "star":
            poly([(math.cos(k * math.pi / 5 - math.pi / 2) * (1 if k % 2 == 0 else 0.42),
                   math.sin(k * math.pi / 5 - math.pi / 2) * (1 if k % 2 == 0 else 0.42)) for k in range(10)])
        elif kind == "stripes":                                             # 4 parallel bars in a square patch
            for k in range(4):
                y0 = -1 + 0.5 * k
                poly([(-1, y0), (1, y0), (1, y0 + 0.25), (-1, y0 + 0.25)])
        elif kind == "checker":                                             # a 4 x 4 two-colour checker board
            c2 = self._color(rng, np.array(color))
            for i in range(4):
                for j in range(4):
                    x0, y0 = -0.9 + 0.45 * i, -0.9 + 0.45 * j
                    poly([(x0, y0), (x0 + 0.45, y0), (x0 + 0.45, y0 + 0.45), (x0, y0 + 0.45)],
                         fill=color if (i + j) % 2 else c2)
        elif kind == "gradient blob":                                       # a rotated elliptic blob, radial ramp
            c2 = np.array(self._color(rng, np.array(color)), np.float32)
            dx, dy = u[None, :] * S - cx, u[:, None] * S - cy               # (1, S), (S, 1) in pixels
            ex, ey = (dx * cos + dy * sin) / r, (-dx * sin + dy * cos) / (0.7 * r)  # (S, S) rotated axes
            d = np.sqrt(ex * ex + ey * ey)                                  # (S, S) 0 at centre, 1 on the rim
            alpha = np.clip((1.0 - d) * r / 1.5, 0, 1)[..., None]           # ~1.5 px soft rim, (S, S, 1)
            fill = np.array(color, np.float32) + (c2 - np.array(color, np.float32)) * d[..., None].clip(0, 1)
            arr = np.asarray(img, dtype=np.float32)                         # (S, S, 3)
            img = Image.fromarray((arr + alpha * (fill - arr)).round().clip(0, 255).astype(np.uint8))
        else:
            raise ValueError(f"unknown shape kind {kind!r}")
        return img


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder (the ImageNet layout)
# ----------------------------------------------------------------------------------------------------------------


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/**/<image> with extensions .jpg .jpeg .png .webp .bmp (any case); classes sorted -> labels 0..C-1
    (hidden folders such as .ipynb_checkpoints are ignored).

    Transforms (Appendix A.1; as torchvision's Resize + RandomCrop + RandomHorizontalFlip / CenterCrop, in PIL):
      train=True : resize the shorter side to `size` (bicubic), random size x size crop, random horizontal flip
                   (if `flip`).
      train=False: resize the shorter side to `size` (bicubic), centre crop. Deterministic.
    [i] -> (image (3, size, size) float in [-1, 1], label int)

    Randomness: the crop offset and the flip of item i in epoch e are drawn from a generator seeded with
    (seed, e, i), never from a global RNG. So they do not depend on the worker that loads the item, on the number
    of workers, or on where a loader iterator started: a run resumed mid-epoch sees exactly the crops of the
    uninterrupted run. The training loop calls `set_epoch(e)` before it builds each epoch's loader.

    Unreadable files (truncated JPEG, junk bytes, empty file, ...): __getitem__ records the path and the error in
    this object's skip list, warns once per file on stderr, and returns the next readable item (index + 1, + 2, ...
    modulo len, at most `max_attempts` tries, then a ValueError). `skipped` (list of paths) and `num_skipped` are
    PER PROCESS: with num_workers > 0 each worker process fills its own copy and the main process' list stays
    empty (the stderr warnings come from every process).
    """

    def __init__(self, root, size=256, train=True, flip=True, max_attempts=64, seed=0):
        root = os.fspath(root)
        if not os.path.exists(root):
            raise FileNotFoundError(f"ImageFolder: '{root}' does not exist (expected the layout "
                                    f"{root}/<class>/<image>.jpg)")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageFolder: '{root}' is not a directory (expected the layout "
                                    f"{root}/<class>/<image>.jpg)")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(f"ImageFolder: '{root}' has no class sub-folders: expected the layout "
                             f"{root}/<class>/<image>.jpg (ImageNet train/val style)")
        samples, empty = [], []
        for label, cls in enumerate(classes):
            found = []
            for dirpath, dirnames, files in os.walk(os.path.join(root, cls), followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            samples += [(path, label) for path in sorted(found)]
            if not found:
                empty.append(cls)
        if not samples:
            raise ValueError(f"ImageFolder: the {len(classes)} class folder(s) of '{root}' hold no images "
                             f"({' '.join(IMAGE_EXTENSIONS)}, any case)")
        if empty:
            print(f"ImageFolder: warning: {len(empty)} of {len(classes)} class folders of '{root}' hold no images "
                  f"(e.g. {empty[:3]}); their labels stay reserved", file=sys.stderr)
        if int(size) < 1 or int(max_attempts) < 1:
            raise ValueError(f"ImageFolder: size and max_attempts must be >= 1, got {size}, {max_attempts}")
        self.root, self.classes, self.samples = root, classes, samples
        self.size, self.train, self.flip, self.max_attempts = int(size), bool(train), bool(flip), int(max_attempts)
        self.seed, self.epoch = int(seed), 0
        self._skipped = {}                                                  # path -> error message (this process)

    def set_epoch(self, epoch):
        """The epoch whose crops and flips __getitem__ draws (see Randomness above)."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.samples)

    @property
    def skipped(self):
        """Paths of the unreadable files met so far in THIS process (in the order they were met)."""
        return list(self._skipped)

    @property
    def num_skipped(self):
        return len(self._skipped)

    # ---- transforms ------------------------------------------------------------------------------------------

    def _decode(self, path):
        """Open and fully decode one file to RGB; any error here means an unreadable file."""
        with Image.open(path) as im:
            return to_rgb8(im)                                              # forces the full decode

    def _transform(self, img, index):
        w, h = img.size
        s = self.size
        if w <= h:                                                          # shorter side -> size (torchvision rule)
            new_w, new_h = s, max(s, int(s * h / w))
        else:
            new_w, new_h = max(s, int(s * w / h)), s
        img = img.resize((new_w, new_h), Image.BICUBIC)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])     # (seed, epoch, item): exact on resume
            top, left = int(rng.integers(0, new_h - s + 1)), int(rng.integers(0, new_w - s + 1))
            flip = self.flip and bool(rng.random() < 0.5)
        else:
            top, left, flip = (new_h - s) // 2, (new_w - s) // 2, False
        img = img.crop((left, top, left + s, top + s))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img)

    def __getitem__(self, index):
        n = len(self.samples)
        if not 0 <= index < n:
            raise IndexError(f"ImageFolder index {index} out of range [0, {n})")
        errors = []
        for attempt in range(min(n, self.max_attempts)):
            i = (index + attempt) % n                                       # deterministic: the next file
            path, label = self.samples[i]
            try:
                img = self._decode(path)
            except Exception as e:                                          # PIL raises OSError, ValueError, ...
                msg = f"{type(e).__name__}: {e}"
                errors.append(f"{path} ({msg})")
                if path not in self._skipped:
                    self._skipped[path] = msg
                    print(f"ImageFolder: skipped unreadable image {path} ({msg})", file=sys.stderr)
                continue
            return self._transform(img, index), label
        raise ValueError(f"ImageFolder: {len(errors)} consecutive unreadable images from index {index} of "
                         f"'{self.root}' - is the folder corrupt? First: {errors[:3]}")


SHAPES_DATA = {"shapes": "simple", "shapes-rich": "rich"}           # --data names of the embedded shapes' styles


def build_dataset(data=None, split="train", size=64, crop_seed=0, **kw):
    """The dataset for --data.

    data=None or "shapes" -> ShapesDataset(split, size, **kw) (kw: num_images, num_classes, seed), the simple style;
    "shapes-rich" -> the rich style. Their images are fixed.
    data=DIR  -> ImageFolder(root, size, train=(split == "train"), seed=crop_seed, **kw) (kw: flip, max_attempts)
                 (crop_seed: the seed of the training crops and flips), where root is
                 the first directory of DIR/<split>, DIR/train, DIR. So DIR may be an ImageNet root holding
                 train/ and val/ (each split reads its own), or a single image folder (both splits read it; "val"
                 then uses the deterministic evaluation transforms, resize + centre crop).
    """
    if split not in ("train", "val"):
        raise ValueError(f"build_dataset: split must be 'train' or 'val', got {split!r}")
    if data is None or data in SHAPES_DATA:
        return ShapesDataset(split, size=size, style=SHAPES_DATA.get(data, "simple"), **kw)
    data = os.fspath(data)
    root = next((d for d in (os.path.join(data, split), os.path.join(data, "train")) if os.path.isdir(d)), data)
    if split == "val" and root != os.path.join(data, "val"):
        print(f"build_dataset: warning: {data} has no val/ folder, so the held-out split reads {root}, the training "
              f"images: scores on it are not on unseen images", file=sys.stderr)
    return ImageFolder(root, size=size, train=split == "train", seed=crop_seed, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Batch crops
# ----------------------------------------------------------------------------------------------------------------


def _resize(x, hw):
    """Bilinear resize of (B, C, h, w) to hw, antialiased when downsampling; computed in float32."""
    down = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    return F.interpolate(x.float(), size=hw, mode="bilinear", align_corners=False, antialias=down).to(x.dtype)


def random_resized_crop(x, size, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), generator=None, flip=True):
    """Per-sample random resized crops of a batch: (B, 3, H, W) -> (B, 3, size, size).

    For each image (torchvision's RandomResizedCrop rule): draw an area fraction in `scale` and a log-uniform aspect
    ratio w/h in `ratio`, accept if the box fits (10 tries, else the largest centred box with a ratio within
    `ratio`), place it uniformly, resize bilinearly (antialiased when downsampling), then flip horizontally with
    probability 1/2 if `flip`. All draws come from `generator` (a CPU torch.Generator; the global RNG if None), so
    the crops are deterministic given its seed.
    """
    if x.dim() != 4:
        raise ValueError(f"random_resized_crop expects a batch (B, C, H, W), got shape {tuple(x.shape)}")
    B, _, H, W = x.shape
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    out = []
    for b in range(B):
        for _ in range(10):
            u = torch.rand(2, generator=generator).tolist()
            area = H * W * (scale[0] + (scale[1] - scale[0]) * u[0])
            aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])            # w / h
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= W and 0 < h <= H:
                break
        else:                                                               # fallback: centred, ratio clamped
            aspect = min(max(W / H, ratio[0]), ratio[1])
            w, h = (W, round(W / aspect)) if W / H < aspect else (round(H * aspect), H)
            w, h = max(1, min(w, W)), max(1, min(h, H))
        top = int(torch.randint(0, H - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, W - w + 1, (1,), generator=generator))
        crop = _resize(x[b:b + 1, :, top:top + h, left:left + w], (size, size))  # (1, C, size, size)
        if flip and bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop.flip(-1)
        out.append(crop)
    return torch.cat(out)                                                   # (B, C, size, size)


def resize_crop(x, size):
    """Resize the shorter side of a batch to `size` (bilinear, antialiased when downsampling), then centre crop:
    (B, C, H, W) -> (B, C, size, size)."""
    if x.dim() != 4:
        raise ValueError(f"resize_crop expects a batch (B, C, H, W), got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H <= W:
        hw = (size, max(size, int(size * W / H)))
    else:
        hw = (max(size, int(size * H / W)), size)
    x = _resize(x, hw)                                                      # (B, C, h, w), min(h, w) = size
    top, left = (hw[0] - size) // 2, (hw[1] - size) // 2
    return x[..., top:top + size, left:left + size]                         # (B, C, size, size)


# ----------------------------------------------------------------------------------------------------------------
# Pictures: image grids and merge groups
# ----------------------------------------------------------------------------------------------------------------


def caption_font(size):
    """PIL's default font at `size` pixels (a scalable font from Pillow 10.1 on; the fixed bitmap font before)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                                                       # Pillow < 10.1
        return ImageFont.load_default()


def save_image_grid(images, path, nrow=8, pad=2, row_labels=None):
    """Images (B, 3, H, W) in [-1, 1] -> a PNG grid with `nrow` images per row and `pad` white pixels between.
    row_labels: one caption per grid row, written in black in a white margin left of the row."""
    if images.dim() == 3:
        images = images[None]                                               # (1, 3, H, W)
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"save_image_grid expects images (B, 3, H, W) with B >= 1, got {tuple(images.shape)}")
    arr = tensor_to_uint8(images)                                           # (B, H, W, 3)
    B, H, W, _ = arr.shape
    ncol = max(1, min(nrow, B))
    rows = math.ceil(B / ncol)
    grid = np.full((rows * (H + pad) + pad, ncol * (W + pad) + pad, 3), 255, np.uint8)  # (rows*H', cols*W', 3)
    for i in range(B):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y:y + H, x:x + W] = arr[i]
    picture = Image.fromarray(grid)
    if row_labels is not None:
        if len(row_labels) != rows:
            raise ValueError(f"save_image_grid: {len(row_labels)} row labels for {rows} rows")
        font = caption_font(max(8, min(14, H // 3)))
        width = max(ImageDraw.Draw(picture).textlength(str(t), font=font) for t in row_labels)
        captioned = Image.new("RGB", (picture.width + int(width) + 2 * pad, picture.height), "white")
        captioned.paste(picture, (int(width) + 2 * pad, 0))
        draw = ImageDraw.Draw(captioned)
        for r, text in enumerate(row_labels):                               # vertically centred on its row
            top, bottom = draw.textbbox((0, 0), str(text), font=font)[1::2]
            draw.text((pad, pad + r * (H + pad) + (H - bottom - top) // 2), str(text), fill="black", font=font)
        picture = captioned
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path)


def group_palette(num_groups):
    """A fixed pseudo-random palette (num_groups, 3) in [-1, 1]: the 7 x 7 x 7 lattice of RGB levels in
    [-0.4, 1] in a fixed shuffled order, so ids up to 342 get colours at least 0.23 apart and consecutive ids look
    unrelated; later ids repeat the lattice shifted down by a fraction of a step. No colour is near the black (-1)
    boundary lines."""
    levels = torch.linspace(-0.4, 1.0, 7, dtype=torch.float64)
    lattice = torch.cartesian_prod(levels, levels, levels)                  # (343, 3)
    lattice = lattice[torch.from_numpy(np.random.default_rng(0).permutation(len(lattice)))]
    ids = torch.arange(num_groups)
    cycle = (ids // len(lattice)).double()[:, None]                         # (G, 1)
    step = float(levels[1] - levels[0])
    shift = (cycle * 0.37 * step) % step                                    # 0 for the first 343 ids
    return (lattice[ids % len(lattice)] - shift).float()                    # (G, 3), all >= -0.64


def colorize_groups(assign, grid_hw, image_size):
    """Which tokens were merged together, as a picture.

    assign (N,) int: the merged-token id of each of the N = gh * gw original tokens (row-major).
    Returns (3, H, W) in [-1, 1] (H, W = image_size, or image_size if an int: (S, S)): every merged group gets
    its own colour from `group_palette`, upsampled nearest from the token grid, and the pixels where the group
    changes (against the pixel above or to the left) are drawn black (-1).
    """
    gh, gw = grid_hw
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    assign = torch.as_tensor(assign).detach().cpu().long().reshape(-1)
    if assign.numel() != gh * gw:
        raise ValueError(f"colorize_groups: assign has {assign.numel()} entries, the grid {gh}x{gw} needs {gh * gw}")
    if assign.numel() and assign.min() < 0:
        raise ValueError("colorize_groups: assign holds negative ids")
    ids = assign.reshape(1, 1, gh, gw).float()                              # (1, 1, gh, gw)
    ids = F.interpolate(ids, size=(H, W), mode="nearest")[0, 0].long()      # (H, W)
    colors = group_palette(int(assign.max()) + 1)[ids].permute(2, 0, 1).contiguous()  # (3, H, W)
    edge = torch.zeros(H, W, dtype=torch.bool)
    edge[1:, :] |= ids[1:, :] != ids[:-1, :]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    colors[:, edge] = -1.0
    return colors


def overlay(image, colors, alpha=0.5):
    """Blend a (3, H, W) colour map (e.g. colorize_groups) over an image (3, H, W) in [-1, 1]; pixels that are
    black (-1) in all channels of `colors` (the group boundaries) stay black."""
    image = image.detach().float().cpu()
    colors = colors.detach().float().cpu()
    if image.shape != colors.shape:
        raise ValueError(f"overlay: image {tuple(image.shape)} and colors {tuple(colors.shape)} differ in shape")
    out = (1 - alpha) * image + alpha * colors
    out[:, (colors == -1.0).all(0)] = -1.0
    return out



class ImageNpzWriter:
    """An ADM-format sample file (`arr_0` uint8 (N, H, W, 3), `labels` (N,)) written batch by batch: the .npz a
    single np.savez would write - a zip archive of .npy files, stored - with arr_0's header first and its rows
    appended as they come, so a run of 50,000 samples holds one batch in memory, not all of them. The file appears
    at `path` only when `close` completes (a temporary file and a rename, like common.save_checkpoint).

        with ImageNpzWriter(path, num_images, (H, W, 3)) as out:
            for batch in ...: out.write(tensor_to_uint8(batch))   # (b, H, W, 3) uint8
            out.labels = labels
    """

    def __init__(self, path, num_images, image_shape):
        self.path, self.shape, self.written, self.labels = path, (int(num_images), *image_shape), 0, None
        self.tmp = f"{path}.tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.arr = self.zip.open("arr_0.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(self.arr, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                        "fortran_order": False, "shape": self.shape})

    def write(self, images):
        """Append uint8 images (b, H, W, 3)."""
        images = np.ascontiguousarray(images)
        if (images.dtype != np.uint8 or images.shape[1:] != self.shape[1:]
                or self.written + len(images) > self.shape[0]):
            raise ValueError(f"ImageNpzWriter: {images.dtype} {images.shape} after {self.written} images does not "
                             f"fit uint8 {self.shape}")
        self.arr.write(images.tobytes())
        self.written += len(images)

    def close(self):
        """Finish the file (every image written, and `labels` set) and move it into place."""
        try:
            self.arr.close()
            if self.written != self.shape[0] or self.labels is None or len(self.labels) != self.shape[0]:
                raise ValueError(f"ImageNpzWriter: {self.written} of {self.shape[0]} images written, labels "
                                 f"{'missing' if self.labels is None else len(self.labels)}")
            with self.zip.open("labels.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(self.labels))
            self.zip.close()
            os.replace(self.tmp, self.path)
        finally:
            self.zip.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            self.close()
        else:                                                               # an error: leave no half-written file
            self.arr.close()
            self.zip.close()
            os.remove(self.tmp)

if __name__ == "__main__":
    ds = ShapesDataset("train", size=64)
    save_image_grid(torch.stack([ds[i][0] for i in range(40)]), "shapes.png", nrow=10)
    print("wrote shapes.png: 40 embedded images; classes", CLASSES)
    for size in (64, 256):
        ds = ShapesDataset("train", size=size)
        n = 400 if size == 64 else 100
        t = time.perf_counter()
        for i in range(n):
            ds[i]
        print(f"ShapesDataset size {size}: {(time.perf_counter() - t) / n * 1e3:.2f} ms per image (one process)")
