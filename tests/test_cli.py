"""The README's remaining `python -m` entry points, run as a user types them (shrunk in size):
the synthetic data writer and the MoRe ablation tool. (wsss.train, wsss.eval, torchrun and
wsss.tools.layer_entropy run in tests/test_recipes.py.)"""
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]

SHRINK = ["model.embed_dim=32", "model.depth=3", "model.num_heads=2", "model.patch_size=8", "model.img_size=32",
          "model.decoder_dim=16", "data.crop_size=32", "data.num_workers=0", "train.batch_size=2", "train.max_iters=2",
          "train.ckpt_interval=2", "train.log_interval=1", "cam.scales=[1.0]", "cam.par_dilations=[1,2]",
          "cam.par_iters=2", "eval.scales=[1.0]", "eval.cam_scales=[1.0]", "eval.lam_seg_scales=[1.0]",
          "eval.input_size=32", "eval.val_images=2", "eval.train_images=2", "eval.panels=1", "device=cpu"]


def _run(args, cwd=REPO):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stderr[-3000:]}"
    return proc


def test_synthetic_data_command_and_its_errors(tmp_path):
    out = tmp_path / "syn"
    proc = _run(["wsss.data.synthetic", "--out", str(out), "--num-train", "4", "--num-val", "2", "--size", "40",
                 "--classes", "3"])
    assert "synthetic data set ready" in proc.stdout
    names = (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(names) == 4
    with Image.open(out / "SegmentationClassAug" / f"{names[0]}.png") as im:
        assert im.mode == "P"
    bad = subprocess.run([sys.executable, "-m", "wsss.data.synthetic", "--out", str(tmp_path / "x"), "--classes", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "classes" in bad.stderr


def test_more_ablation_command(tmp_path):
    data = tmp_path / "syn"
    _run(["wsss.data.synthetic", "--out", str(data), "--num-train", "6", "--num-val", "2", "--size", "40",
          "--classes", "3"])
    run = tmp_path / "abl"
    proc = _run(["wsss.tools.ablation", "--cfg", "configs/demo.yaml", f"data.root={data}", f"run_dir={run}",
                 "data.train_split=train", *SHRINK])
    table = (run / "ablation" / "results.md").read_text()
    assert proc.stdout.strip().startswith("Ablation of `configs/demo.yaml`")
    for variant in ("full", "no GCR", "no LIR", "no GCR, no LIR"):
        assert f"| {variant} |" in table
    full = next(line for line in table.splitlines() if line.startswith("| full |"))
    assert "—" not in full  # the full model has every column (LAM rows need GCR)
    assert list((run / "ablation" / "panels").glob("*.png"))
