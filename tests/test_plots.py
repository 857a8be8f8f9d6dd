"""plots.py through `evaluate.py curves`: the PNG's size from the number of logged quantities and runs, every run's
colour in the panels of the quantities it logs and only there, one-line refusals of a missing or empty log."""
import json
import math

import numpy as np
from PIL import Image

import evaluate

BLUE, RED = (31, 119, 180), (214, 39, 40)         # the first two colours (tab10): run a, run b


def write_log(folder, rows):
    folder.mkdir()
    with open(folder / "log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def stage1_rows(steps, with_commit, scale):
    return [{"step": s, "lr": 1e-3 if s < 80 else 1e-4, "K": 64, "batch_usage": 0.1 + s / 1000,
             **({"commit": 0.5 * scale - s / 400} if with_commit else {}), "recon": scale * math.exp(-s / 50),
             "images_per_s": 5.0 + (s % 3)} for s in steps]


def panel(arr, p, legend_rows):
    """Pixels of panel p: 360 x 240 each, 3 to a row, under the legend (16 px per run + 8)."""
    top = 16 * legend_rows + 8 + (p // 3) * 240
    return arr[top:top + 240, (p % 3) * 360:(p % 3 + 1) * 360]


def has(pixels, colour):
    return bool((pixels == np.array(colour, np.uint8)).all(-1).any())


def test_curves_overlays_every_logged_quantity(tmp_path, capsys):
    write_log(tmp_path / "a", stage1_rows(range(10, 101, 10), True, 1.0))
    rows_b = stage1_rows(range(10, 61, 10), False, 2.0)
    rows_b[2]["recon"] = float("nan")                                      # a diverged value breaks the line
    write_log(tmp_path / "b", rows_b)
    out = tmp_path / "pics" / "curves.png"
    assert evaluate.main(["curves", str(tmp_path / "a"), str(tmp_path / "b" / "log.jsonl"), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    arr = np.array(Image.open(out).convert("RGB"))
    # 6 quantities (lr, K, batch_usage, commit, recon, images_per_s): 2 rows of 3 panels; a legend of 2 runs
    assert arr.shape == (2 * 240 + 2 * 16 + 8, 3 * 360, 3)
    assert has(arr[:40], BLUE) and has(arr[:40], RED)                      # the legend
    for p in range(6):                                                     # commit (panel 3): run a only
        assert has(panel(arr, p, 2), BLUE), p
        assert has(panel(arr, p, 2), RED) == (p != 3), p


def test_curves_refuses_a_missing_or_empty_log_in_one_line(tmp_path, capsys):
    write_log(tmp_path / "empty", [])
    write_log(tmp_path / "ok", stage1_rows([1, 2], True, 1.0))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    out = str(tmp_path / "c.png")
    cases = [([str(tmp_path / "missing")], "no such log"), ([str(tmp_path / "empty")], "the log is empty"),
             ([str(tmp_path / "ok"), str(tmp_path / "junk")], "line 2 is not JSON"),
             ([str(tmp_path / "ok"), "--out", str(tmp_path / "c.jpg")], "name a .png file")]
    for argv, message in cases:
        assert evaluate.main(["curves", *argv, *(["--out", out] if "--out" not in argv else [])]) == 1, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    assert not (tmp_path / "c.png").exists()                               # checked before anything is drawn
