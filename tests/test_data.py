"""data.py: the procedural dataset (determinism, held-out split, scale invariance, flat regions + edges), ImageFolder
(corrupt files skipped and counted, clear errors, transforms), batch crops against brute force, picture helpers."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import (ImageFolder, ShapesDataset, build_dataset, colorize_groups, overlay, random_resized_crop,
                  resize_crop, save_image_grid)


# ----------------------------------------------------------------------------------------------------------------
# ShapesDataset
# ----------------------------------------------------------------------------------------------------------------


def test_shapes_deterministic_and_seeded():
    a, b = ShapesDataset("train", size=32), ShapesDataset("train", size=32)
    for i in (0, 7, 19999):
        x1, y1 = a[i]
        x2, y2 = b[i]
        assert torch.equal(x1, x2) and y1 == y2
    assert torch.equal(a[5][0], a[5][0])                                   # no hidden state between calls
    other = ShapesDataset("train", size=32, seed=1)
    assert all((a[i][0] - other[i][0]).abs().mean() > 0.05 for i in range(5))


def test_shapes_train_and_val_are_disjoint():
    train, val = ShapesDataset("train", size=32), ShapesDataset("val", size=32)
    xt = torch.stack([train[i][0] for i in range(50)]).flatten(1)          # (50, D)
    xv = torch.stack([val[i][0] for i in range(50)]).flatten(1)            # (50, D)
    dist = torch.cdist(xt, xv) / xt.shape[1] ** 0.5                        # RMS difference of every pair
    assert dist.min() > 0.05


def test_shapes_labels_range_shape_and_balance():
    ds = ShapesDataset("train", size=24, num_images=300)
    assert len(ds) == 300 and len(ShapesDataset("val")) == 1000 and len(ShapesDataset("train")) == 20000
    labels = []
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        labels.append(y)
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.min() >= 20 and counts.max() <= 40  # every class, roughly balanced
    with pytest.raises(IndexError):
        ds[300]
    assert ShapesDataset(size=37)[0][0].shape == (3, 37, 37)               # odd sizes work
    assert {ShapesDataset(num_classes=3, num_images=30)[i][1] for i in range(30)} == {0, 1, 2}


def test_shapes_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("test")
    with pytest.raises(ValueError, match="num_classes"):
        ShapesDataset(num_classes=11)
    with pytest.raises(ValueError, match="num_images"):
        ShapesDataset(num_images=0)


def test_shapes_same_scene_at_two_sizes():
    small, large = ShapesDataset("val", size=64), ShapesDataset("val", size=128)
    same, other = [], []
    for i in range(20):
        x = small[i][0]
        y = F.interpolate(large[i][0][None], size=(64, 64), mode="bilinear", antialias=True,
                          align_corners=False)[0]
        same.append((x - y).abs().mean().item())
        other.append((x - small[i + 1][0]).abs().mean().item())
    assert np.mean(same) < 0.03 and max(same) < 0.06                        # a few edge pixels differ at most
    assert np.mean(same) < 0.1 * np.mean(other)


def test_shapes_have_flat_regions_and_edges():
    ds = ShapesDataset("train", size=64)
    x = torch.stack([ds[i][0] for i in range(60)])                         # (60, 3, 64, 64)
    dy = (x[..., 1:, 1:] - x[..., :-1, 1:]).abs().amax(1)                  # (60, 63, 63)
    dx = (x[..., 1:, 1:] - x[..., 1:, :-1]).abs().amax(1)                  # (60, 63, 63)
    grad = torch.maximum(dx, dy)
    flat = (grad == 0).float().mean((1, 2))                                # fraction of exactly flat pixels
    assert flat.mean() > 0.25                                               # token merging has something to merge
    assert (grad.amax((1, 2)) > 0.3).all()                                  # every image has a real edge
    assert (x.flatten(1).std(1) > 0.05).all()                               # no constant image
    # the classes are not one colour: the mean colour of an image says little about its label
    means = torch.stack([ds[i][0].mean((1, 2)) for i in range(100)])       # (100, 3)
    by_class = torch.stack([means[c::10].mean(0) for c in range(10)])      # (10, 3)
    assert by_class.std(0).max() < means.std(0).min()


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------------------------

GOOD = {  # file name -> (class, flat colour)
    "a/0.png": ("a", (230, 20, 20)),
    "a/1.PNG": ("a", (20, 230, 20)),
    "a/2.jpg": ("a", (20, 20, 230)),
    "b/0.JPEG": ("b", (230, 230, 20)),
    "b/sub/1.png": ("b", (20, 230, 230)),
}
BAD = ["a/junk.jpg", "a/truncated.jpg", "b/empty.png"]


def make_folder(root):
    for name, (_, color) in GOOD.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), color).save(path, format="JPEG" if name.lower().endswith(("jpg", "jpeg"))
                                                else "PNG", quality=95)
    (root / "a" / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 certainly not a jpeg" * 10)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "a" / "truncated.jpg", quality=95)
    blob = (root / "a" / "truncated.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(blob[:len(blob) // 2])
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "notes.txt").write_text("not an image")                # ignored: not an image extension
    (root / ".hidden").mkdir()                                             # ignored: hidden folder
    return str(root)


def match_good(x):
    """The good file whose flat colour x shows (mean colour within 12 levels), or None."""
    mean = ((x.mean((1, 2)) + 1) * 127.5).numpy()
    for name, (cls, color) in GOOD.items():
        if np.abs(mean - np.array(color)).max() < 12:
            return name, cls
    return None


def test_imagefolder_skips_corrupt_files(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    ds = ImageFolder(root, size=16, train=True)
    assert ds.classes == ["a", "b"] and len(ds) == len(GOOD) + len(BAD)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False, num_workers=0)
    items = [(x, y) for xb, yb in loader for x, y in zip(xb, yb.tolist())]
    assert len(items) == len(ds)
    for x, y in items:
        assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
        found = match_good(x)
        assert found is not None, "an item did not come from a good file"
        assert ds.classes[y] == found[1]
    assert ds.num_skipped == 3
    assert sorted(ds.skipped) == sorted(os.path.join(root, p) for p in BAD)
    assert "skipped unreadable image" in capsys.readouterr().err
    for _ in loader:                                                        # a second epoch counts no file twice
        pass
    assert ds.num_skipped == 3


def test_imagefolder_with_workers(tmp_path):
    root = make_folder(tmp_path / "data")
    ds = ImageFolder(root, size=16, train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    xs = torch.cat([xb for xb, _ in loader])
    assert xs.shape == (len(ds), 3, 16, 16)
    assert all(match_good(x) is not None for x in xs)
    assert ds.num_skipped == 0                                              # the workers counted (per process)


def test_imagefolder_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="hold no images"):
        ImageFolder(tmp_path / "noimg")
    (tmp_path / "allbad" / "cls").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "allbad" / "cls" / f"{i}.jpg").write_bytes(b"junk")
    ds = ImageFolder(tmp_path / "allbad", size=8)
    with pytest.raises(ValueError, match="3 consecutive unreadable"):
        ds[1]
    with pytest.raises(IndexError):
        ds[3]


def test_imagefolder_transforms(tmp_path):
    # a wide image: red | green | blue thirds; the centre crop of the resized image sees only green
    arr = np.zeros((30, 90, 3), np.uint8)
    arr[:, :30, 0] = arr[:, 30:60, 1] = arr[:, 60:, 2] = 255
    (tmp_path / "d" / "c").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "d" / "c" / "wide.png")
    # a square image: black left half, white right half (to see flips)
    half = np.zeros((20, 20, 3), np.uint8)
    half[:, 10:] = 255
    Image.fromarray(half).save(tmp_path / "d" / "c" / "zhalf.png")

    ev = ImageFolder(tmp_path / "d", size=12, train=False)
    x, y = ev[0]
    assert x.shape == (3, 12, 12) and y == 0 and torch.equal(x, ev[0][0])  # deterministic
    inner = (x[:, :, 2:-2] + 1) * 127.5                                     # away from bicubic ringing
    assert inner[1].min() > 230 and inner[0].max() < 25 and inner[2].max() < 25

    # training crops and flips: a function of (seed, epoch, index) only, whatever the global RNG does
    tr = ImageFolder(tmp_path / "d", size=12, train=True, seed=3)
    crops = []
    for epoch in range(30):
        tr.set_epoch(epoch)
        torch.manual_seed(epoch)                                           # the global RNG plays no part
        crops.append(tr[0][0])
    tr.set_epoch(5)
    assert torch.equal(tr[0][0], crops[5])
    assert torch.equal(ImageFolder(tmp_path / "d", size=12, seed=3)[0][0], crops[0])    # a new object, epoch 0
    assert any((c[0] > 0).any() for c in crops) and any((c[2] > 0).any() for c in crops)  # crops move
    left = []
    for epoch in range(30):
        tr.set_epoch(epoch)
        left.append(tr[1][0][:, :, 0].mean().item())                      # the whole image, maybe flipped
    assert min(left) < -0.9 and max(left) > 0.9
    noflip = ImageFolder(tmp_path / "d", size=12, train=True, flip=False)
    for epoch in range(10):
        noflip.set_epoch(epoch)
        assert noflip[1][0][:, :, 0].mean() < -0.9


def test_sixteen_bit_images_keep_their_range(tmp_path):
    """A 16-bit greyscale PNG at 1/4 of its range must read as a quarter grey, not saturate to white."""
    (tmp_path / "d" / "c").mkdir(parents=True)
    Image.fromarray(np.full((16, 16), 16384, np.uint16)).save(tmp_path / "d" / "c" / "grey16.png")
    x, _ = ImageFolder(tmp_path / "d", size=16, train=False)[0]
    # 16384 / 65535 * 255 = 63.75 -> 64 -> 64 / 127.5 - 1 = -0.498
    assert torch.allclose(x, torch.full_like(x, 64 / 127.5 - 1), atol=1e-6)


def test_build_dataset_rule(tmp_path):
    assert isinstance(build_dataset(None, "val", size=16), ShapesDataset)
    assert build_dataset(None, "train", size=16, num_images=5).num_images == 5
    for split in ("train", "val"):
        make_folder(tmp_path / "root" / split)
    assert build_dataset(tmp_path / "root", "train", size=8).root == str(tmp_path / "root" / "train")
    val = build_dataset(tmp_path / "root", "val", size=8)
    assert val.root == str(tmp_path / "root" / "val") and not val.train
    single = make_folder(tmp_path / "single")
    assert build_dataset(single, "train", size=8).train
    val = build_dataset(single, "val", size=8)
    assert val.root == single and not val.train
    with pytest.raises(ValueError, match="split"):
        build_dataset(None, "test")


# ----------------------------------------------------------------------------------------------------------------
# Batch crops
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 24])
def test_full_crop_is_a_plain_resize(size):
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    out = random_resized_crop(x, size, scale=(1, 1), ratio=(1, 1), generator=g, flip=False)
    ref = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 16)
    assert out.shape == (3, 3, size, size)
    torch.testing.assert_close(out, ref)


def test_random_resized_crop_deterministic_and_varied():
    x = torch.rand(6, 3, 20, 28) * 2 - 1
    a = random_resized_crop(x, 10, generator=torch.Generator().manual_seed(1))
    b = random_resized_crop(x, 10, generator=torch.Generator().manual_seed(1))
    c = random_resized_crop(x, 10, generator=torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 10, 10) and torch.equal(a, b) and not torch.equal(a, c)


def test_random_resized_crop_matches_some_window():
    # scale 1/4 and ratio 1 on a 16x16 image: each output is the resize of an 8x8 window (brute force over all)
    x = torch.randn(4, 3, 16, 16)
    out = random_resized_crop(x, 8, scale=(0.25, 0.25), ratio=(1, 1), generator=torch.Generator().manual_seed(0),
                              flip=False)
    positions = set()
    for b in range(4):
        hits = [(t, l) for t in range(9) for l in range(9) if torch.equal(out[b], x[b, :, t:t + 8, l:l + 8])]
        assert len(hits) == 1
        positions.add(hits[0])
    assert len(positions) > 1                                               # per-sample positions


def test_random_resized_crop_flips_per_sample():
    x = torch.randn(16, 3, 8, 8)
    out = random_resized_crop(x, 8, scale=(1, 1), ratio=(1, 1), generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_resize_crop():
    x = torch.randn(2, 3, 20, 40)
    ref = F.interpolate(x, size=(10, 20), mode="bilinear", align_corners=False, antialias=True)[..., 5:15]
    torch.testing.assert_close(resize_crop(x, 10), ref)
    assert resize_crop(torch.randn(1, 3, 30, 12), 6).shape == (1, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resize_crop(x.bfloat16(), 10).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------------------


def test_colorize_groups_colours_and_boundaries():
    assign = torch.tensor([0, 0, 1, 1,
                           0, 0, 1, 1,
                           2, 2, 3, 3,
                           2, 4, 4, 3])
    colors = colorize_groups(assign, (4, 4), 32)
    assert colors.shape == (3, 32, 32) and colors.min() >= -1 and colors.max() <= 1
    centre = colors[:, 4::8, 4::8].permute(1, 2, 0).reshape(16, 3)         # (16, 3) one pixel per token
    for i in range(16):
        for j in range(16):
            same = torch.equal(centre[i], centre[j])
            assert same == (assign[i] == assign[j]).item(), (i, j)
            if not same:
                assert (centre[i] - centre[j]).norm() > 0.2
    assert (colors[:, 16, 0:16] == -1).all()                                # between groups 0 and 2
    assert (colors[:, 0:16, 16] == -1).all()                                # between groups 0 and 1
    assert (colors[:, 0:16, 8] != -1).any(0).all()                          # no line inside group 0 (2x2 tokens)
    assert (colors[:, 8, 0:16] != -1).any(0).all()
    # a grid size that does not divide the image size
    assert colorize_groups(torch.arange(9), (3, 3), 20).shape == (3, 20, 20)
    # the palette: 1024 groups (a 32x32 token grid) all distinct, the first 343 far apart, none near black
    pal = data.group_palette(1024)                                          # (1024, 3)
    dist = torch.cdist(pal, pal) + 10 * torch.eye(1024)
    assert dist.min() > 0.05 and dist[:343, :343].min() > 0.2 and pal.max(1).values.min() > -0.7
    with pytest.raises(ValueError, match="grid"):
        colorize_groups(torch.arange(10), (3, 3), 12)


def test_overlay_keeps_boundaries_dark():
    image = torch.full((3, 32, 32), 0.5)
    colors = colorize_groups(torch.tensor([0, 1, 2, 3]), (2, 2), 32)
    out = overlay(image, colors, alpha=0.5)
    edge = (colors == -1).all(0)
    assert edge.any() and (out[:, edge] == -1).all()
    torch.testing.assert_close(out[:, ~edge], 0.5 * image[:, ~edge] + 0.5 * colors[:, ~edge])


def test_save_image_grid_round_trip(tmp_path):
    images = torch.rand(5, 3, 8, 10) * 2 - 1
    path = tmp_path / "sub" / "grid.png"
    save_image_grid(images, str(path), nrow=3, pad=2)
    with Image.open(path) as im:
        assert im.size == (3 * (10 + 2) + 2, 2 * (8 + 2) + 2)               # (width, height)
        arr = np.asarray(im.convert("RGB"))
    expected = data.tensor_to_uint8(images[4])                              # row 1, column 1
    assert np.array_equal(arr[2 + 10:2 + 10 + 8, 2 + 12:2 + 12 + 10], expected)
    assert (arr[:2] == 255).all()                                           # white padding
    with pytest.raises(ValueError):
        save_image_grid(torch.zeros(2, 1, 4, 4), str(path))


def test_image_npz_writer_streams_what_np_savez_would_write(tmp_path):
    """Rows written in three pieces read back by np.load as one uint8 array with its labels, byte for byte what
    np.savez writes; a wrong piece is refused, and an error inside the block leaves no file behind."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    path = str(tmp_path / "s.npz")
    with data.ImageNpzWriter(path, 7, (5, 4, 3)) as out:
        for piece in (images[:2], images[2:3], images[3:]):
            out.write(piece)
        out.labels = labels
    f = np.load(path)
    assert sorted(f.files) == ["arr_0", "labels"]
    assert f["arr_0"].dtype == np.uint8 and np.array_equal(f["arr_0"], images)
    assert np.array_equal(f["labels"], labels)
    np.savez(tmp_path / "reference.npz", arr_0=images, labels=labels)
    ref = np.load(tmp_path / "reference.npz")
    assert all(np.array_equal(ref[k], f[k]) and ref[k].dtype == f[k].dtype for k in ("arr_0", "labels"))
    with pytest.raises(ValueError, match="does not fit"):
        with data.ImageNpzWriter(str(tmp_path / "bad.npz"), 2, (5, 4, 3)) as out:
            out.write(images[:3])                                                # one image too many
    with pytest.raises(ValueError, match="1 of 2 images"):
        with data.ImageNpzWriter(str(tmp_path / "short.npz"), 2, (5, 4, 3)) as out:
            out.write(images[:1])
            out.labels = labels[:2]
    assert sorted(os.listdir(tmp_path)) == ["reference.npz", "s.npz"]
