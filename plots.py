"""Training curves: the log.jsonl of one or more runs drawn into one PNG, with PIL like the project's other pictures.

train_stage1.py and train_stage2.py append one JSON row per logging interval to <out>/log.jsonl: the step, the
learning rate and the running means of every logged term (stage 1: the loss terms of the objective, the kept count
K, `batch_usage`, images per second; stage 2: the loss, K, the gradient norm, sequences per second). `draw_curves`
gives every numeric key but `step` a panel, the step on the x axis, one colour per run, so that runs overlay for
comparison (two variants, two seeds, a resumed run against the straight one). A key a run does not log is left
out of its panel; a non-finite value breaks that run's line.

Layout: panels of PANEL_W x PANEL_H pixels, COLUMNS to a row, in the order the keys first appear in the logs; above
them a legend strip of LEGEND_H pixels per run. One panel's y axis spans the values of all runs; the x axis is
shared by all panels (the smallest to the largest step of any run).

    python evaluate.py curves runs/stage1-g-tiny --out curves.png                   # one run
    python evaluate.py curves runs/stage2-mergear-tiny runs/stage2-llamagen-tiny --out stage2.png   # overlaid

    from plots import read_log, draw_curves
    draw_curves({"g": read_log("runs/stage1-g-tiny")}, "curves.png")
"""
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H, COLUMNS, LEGEND_H = 360, 240, 3, 16
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 58, 12, 22, 30          # the plot box inside a panel
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]    # matplotlib's tab10


def log_path(run):
    """A run folder (its log.jsonl) or the path of a log file itself."""
    return os.path.join(run, "log.jsonl") if os.path.isdir(run) else run


def read_log(run):
    """The rows of a run's log.jsonl, each a dict with a numeric `step`; one-line errors for a missing, empty or
    malformed log."""
    path = log_path(run)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run}: no such log (expected a run folder holding log.jsonl, or a .jsonl file)")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {n} is not JSON (a log written by train_stage1.py / "
                                 f"train_stage2.py holds one JSON object per line)") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                raise ValueError(f"{path}: line {n} has no numeric 'step'")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: the log is empty (no row was logged yet)")
    return rows


def quantities(logs):
    """Every numeric key but `step`, in the order of first appearance over the runs."""
    keys = {}
    for rows in logs.values():
        for row in rows:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.setdefault(k, None)
    return list(keys)


def picture_size(num_panels, num_runs):
    """(width, height) of the PNG: COLUMNS panels to a row under a legend strip of one line per run."""
    cols = min(COLUMNS, num_panels)
    return cols * PANEL_W, math.ceil(num_panels / cols) * PANEL_H + num_runs * LEGEND_H + 8


def font(size=11):
    try:
        return ImageFont.load_default(size=size)                            # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def tick(v):
    return f"{v:.3g}"


def put(d, xy, text, f, align="left", valign="top"):
    """Text placed by hand (the bitmap font of an old Pillow takes no `anchor`): align left / centre / right of x,
    valign top / middle of y."""
    left, top, right, bottom = d.textbbox((0, 0), text, font=f)
    x = xy[0] - {"left": 0, "centre": (right - left) / 2, "right": right - left}[align] - left
    y = xy[1] - {"top": 0, "middle": (bottom - top) / 2}[valign] - top
    d.text((x, y), text, fill="black", font=f)


def value_range(values):
    """(low, high) of a panel's y axis: the finite values, widened by 5% (a constant gets +-5% or +-1)."""
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) if hi > lo else (0.05 * abs(lo) or 1.0)
    return lo - pad, hi + pad


def draw_panel(d, box, key, logs, x_range, f):
    """One quantity: its title, the plot box, 3 ticks on each axis and one line per run."""
    x0, y0, x1, y1 = box
    d.text((x0, y0 - 17), key, fill="black", font=font(12))
    d.rectangle(box, outline="black")
    points = {name: [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
              for name, rows in logs.items()}
    finite = [v for pts in points.values() for _, v in pts if math.isfinite(v)]
    if not finite:
        d.text((x0 + 8, y0 + 8), "no finite value", fill="black", font=f)
        return
    (lo, hi), (s0, s1) = value_range(finite), x_range
    sx = lambda s: x0 + (x1 - x0) * ((s - s0) / (s1 - s0) if s1 > s0 else 0.5)      # noqa: E731
    sy = lambda v: y1 - (y1 - y0) * (v - lo) / (hi - lo)                            # noqa: E731
    for frac in (0.0, 0.5, 1.0):
        v, s = lo + frac * (hi - lo), s0 + frac * (s1 - s0)
        d.line([x0 - 4, sy(v), x0, sy(v)], fill="black")
        put(d, (x0 - 6, sy(v)), tick(v), f, "right", "middle")
        d.line([sx(s), y1, sx(s), y1 + 4], fill="black")
        put(d, (sx(s), y1 + 6), tick(s), f, "centre")
    for colour, pts in zip(COLOURS * (len(points) // len(COLOURS) + 1), points.values()):
        segment = []
        for s, v in pts + [(None, math.nan)]:                               # a non-finite value ends a segment
            if s is not None and math.isfinite(v):
                segment.append((sx(s), sy(v)))
                continue
            if len(segment) > 1:
                d.line(segment, fill=colour, width=2)
            elif segment:
                (px, py), = segment
                d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
            segment = []


def draw_curves(logs, out):
    """logs: {run name: rows of its log.jsonl} -> a PNG at `out` (picture_size) with one panel per quantity."""
    keys = quantities(logs)
    if not keys:
        raise ValueError(f"the logs of {', '.join(logs)} hold no numeric quantity besides 'step'")
    steps = [r["step"] for rows in logs.values() for r in rows]
    width, height = picture_size(len(keys), len(logs))
    img = Image.new("RGB", (width, height), "white")
    d, f = ImageDraw.Draw(img), font()
    for i, (name, colour) in enumerate(zip(logs, COLOURS * (len(logs) // len(COLOURS) + 1))):   # the legend
        y = 4 + i * LEGEND_H + LEGEND_H // 2
        d.line([8, y, 32, y], fill=colour, width=3)
        first, last = min(r["step"] for r in logs[name]), max(r["step"] for r in logs[name])
        put(d, (38, y), f"{name} ({len(logs[name])} rows, steps {first:g}-{last:g})", f, valign="middle")
    top = len(logs) * LEGEND_H + 8
    for p, key in enumerate(keys):
        r, c = divmod(p, COLUMNS)
        px, py = c * PANEL_W, top + r * PANEL_H
        box = (px + MARGIN_L, py + MARGIN_T, px + PANEL_W - MARGIN_R, py + PANEL_H - MARGIN_B)
        draw_panel(d, box, key, logs, (min(steps), max(steps)), f)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    img.save(out)
    return img.size


def run_names(runs):
    """A label per run: its folder's name (the file's name for a log file), the path itself where two collide."""
    names = [os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(r) or r)) for r in runs]
    return [n if names.count(n) == 1 else r for n, r in zip(names, runs)]


def plot_runs(runs, out):
    """The `evaluate.py curves` command: checks (the output a .png that is none of the logs), reads every log
    first, then draws. Returns the picture's size."""
    if not out.lower().endswith(".png"):
        raise ValueError(f"--out {out}: the picture is written as PNG: name a .png file")
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder: name the .png file to write")
    for run in runs:
        if os.path.exists(log_path(run)) and os.path.abspath(out) == os.path.abspath(log_path(run)):
            raise ValueError(f"--out {out} is the log of run {run}: writing it would destroy that log")
    logs = {}
    for name, run in zip(run_names(runs), runs):
        logs[name] = read_log(run)
    return draw_curves(logs, out)
