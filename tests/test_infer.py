"""``python -m wsss.infer`` as users run it: a tiny MoRe trained for 2 iterations on a tiny
synthetic set, then every case through the real command line — a split's segmentation, a
label-less test split in the PASCAL server's layout with CRF, pseudo labels with ignore kept, a
folder of images with overlays and classes.csv, resume after an interruption, the fail-fast
errors, and 2 processes under torchrun."""
import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.config import config_to_dict, load_config
from wsss.data.synthetic import make_synthetic_dataset, voc_palette

from test_train import TINY  # the tiny-model overrides the training tests use

C = 3
REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SERVER = Path("results/VOC2012/Segmentation/comp6_test_cls")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from wsss.train.loop import train

    base = tmp_path_factory.mktemp("infer")
    root = make_synthetic_dataset(base / "syn", seed=0, num_train=8, num_val=3, size=64, num_classes=C)
    # a VOC-style test split: images only, no masks and no image-level labels
    test = [f"test_{i:05d}" for i in range(3)]
    for i, name in enumerate(test):
        shutil.copy(root / "JPEGImages" / f"val_{i:05d}.jpg", root / "JPEGImages" / f"{name}.jpg")
    (root / "ImageSets" / "Segmentation" / "test.txt").write_text("".join(f"{n}\n" for n in test))
    cfg = load_config(None, TINY + [f"data.root={root}", f"run_dir={base / 'run'}", "model.method=more",
                                    "model.num_reg_tokens=2", "train.max_iters=2", "train.ckpt_interval=2"])
    ckpt = train(cfg)
    return SimpleNamespace(root=root, base=base, cfg=base / "run" / "config.yaml", ckpt=ckpt, test=test)


def _env(world: int = 1) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the test suite's switch (conftest), not a user's
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if world > 1:
        env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infer(run, *args, world: int = 1, expect: int = 0) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m"] if world == 1 else [TORCHRUN, f"--nproc_per_node={world}",
                                                       f"--master_port={_free_port()}", "-m"]
    argv = head + ["wsss.infer", "--cfg", str(run.cfg), "--ckpt", str(run.ckpt), *map(str, args)]
    p = subprocess.run(argv, cwd=run.base, env=_env(world), capture_output=True, text=True, timeout=180)
    assert p.returncode == expect, f"{' '.join(argv)}: exit {p.returncode}\n{p.stderr[-3000:]}"
    return p


def check_mask(path: Path, size, allow_ignore: bool = False) -> np.ndarray:
    """A palette PNG of the VOC palette at ``size`` (W,H) holding class indices."""
    with Image.open(path) as im:
        assert im.mode == "P" and im.size == tuple(size), (path, im.mode, im.size)
        assert im.getpalette() == voc_palette()
        labels = np.array(im)
    allowed = set(range(C + 1)) | ({255} if allow_ignore else set())
    assert set(np.unique(labels).tolist()) <= allowed, (path, np.unique(labels))
    return labels


def image_size(path: Path):
    with Image.open(path) as im:
        return im.size


def read_csv(path: Path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_val_split_default_is_more_e2(run, tmp_path):
    out = tmp_path / "val"
    p = infer(run, "--out", out, "--split", "val", "eval.lam_seg_scales=[1.0,0.5]")  # 7 scales: slow
    names = [f"val_{i:05d}" for i in range(3)]
    assert sorted(f.name for f in out.glob("*.png")) == [f"{n}.png" for n in names]
    for n in names:
        check_mask(out / f"{n}.png", image_size(run.root / "JPEGImages" / f"{n}.jpg"))
    assert not (out / "overlays").exists()  # overlays are for folders unless asked for
    assert [r["image"] for r in read_csv(out / "classes.csv")] == names
    assert "export E2, row raw" in p.stderr and "images/s" in p.stderr


def test_label_less_test_split_in_server_layout_with_crf(run, tmp_path):
    out = tmp_path / "test"
    infer(run, "--out", out, "--split", "test", "--voc-server", "--protocol", "E3", "--row", "crf")
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == [(SERVER / f"{n}.png").as_posix() for n in run.test]
    for n in run.test:
        check_mask(out / SERVER / f"{n}.png", image_size(run.root / "JPEGImages" / f"{n}.jpg"))


def test_pseudo_labels_keep_ignore_and_match_the_scored_row(run, tmp_path):
    from wsss.data.folder import split_images
    from wsss.eval.evaluate import load_model
    from wsss.methods import get_method

    out = tmp_path / "pseudo"
    infer(run, "--out", out, "--split", "train", "--protocol", "E1-LAM", "--row", "par", "--limit", 3)
    cfg = load_config(run.cfg)
    model, _ = load_model(cfg, run.ckpt, torch.device("cpu"))
    ds = split_images("voc", run.root, "train")
    (scored,) = get_method("more").protocols(load_config(run.cfg, ["eval.protocols=[extra-LAM]"]))
    seen = set()
    for i in range(3):
        n = ds.names[i]
        labels = check_mask(out / f"{n}.png", image_size(run.root / "JPEGImages" / f"{n}.jpg"), allow_ignore=True)
        seen |= set(np.unique(labels).tolist())
        # the scoring row is the exported labels with the uncertain pixels counted as background
        row = scored.predict(model, [ds[i]], torch.device("cpu"))[0]["extra: LAM + PAR pseudo labels (train)"]
        np.testing.assert_array_equal(np.where(labels == 255, 0, labels), row.numpy())
    assert 255 in seen  # PAR leaves uncertain pixels at the ignore value


def test_aream_pseudo_labels_and_no_segmentation_head(run, tmp_path, capsys):
    from wsss.eval.export import export_predictions
    from wsss.infer.__main__ import main
    from wsss.methods import get_method
    from wsss.utils.checkpoint import save_checkpoint

    cfg = load_config(None, TINY + ["model.method=aream", "aream.layer_index=1", "aream.entropy=none",
                                    f"data.root={run.root}"])
    model = get_method("aream").build_model(cfg.model, C)
    ckpt = tmp_path / "aream.pt"
    save_checkpoint(ckpt, model=model.state_dict(), config=config_to_dict(cfg), num_classes=C)
    summary = export_predictions(cfg, ckpt, tmp_path / "out", split="train", protocol="pseudo-labels", limit=2)
    assert summary["protocol"] == "pseudo-labels" and summary["row"] == "par" and summary["images"] == 2
    for n in ("train_00000", "train_00001"):
        check_mask(tmp_path / "out" / f"{n}.png", image_size(run.root / "JPEGImages" / f"{n}.jpg"), allow_ignore=True)
    cfg_file = tmp_path / "aream.yaml"
    cfg_file.write_text("model:\n  method: aream\n")
    assert main(["--cfg", str(cfg_file), "--ckpt", str(ckpt), "--out", str(tmp_path / "x"), "--split", "val",
                 f"data.root={run.root}"]) == 2
    assert "model.method=aream has no segmentation head" in capsys.readouterr().err


def test_image_folder_masks_overlays_and_classes(run, tmp_path):
    from wsss.data.folder import ImageFolder

    photos = tmp_path / "photos"
    (photos / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 41, 3), dtype=np.uint8)).save(photos / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (47, 33, 4), dtype=np.uint8), "RGBA").save(photos / "sub" / "b.png")
    Image.fromarray(rng.integers(0, 255, (64, 20), dtype=np.uint8), "L").save(photos / "sub" / "deeper" / "c.PNG")
    (photos / "notes.txt").write_text("not an image")
    shutil.copy(photos / "a.jpg", photos / ".hidden.jpg")
    out = photos / "preds"  # inside the input folder: never read back as input
    infer(run, "--out", out, "--images", photos, "--recursive", "--protocol", "E3")
    names = ["a", "sub/b", "sub/deeper/c"]
    sources = {"a": "a.jpg", "sub/b": "sub/b.png", "sub/deeper/c": "sub/deeper/c.PNG"}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        [f"{n}.png" for n in names] + [f"overlays/{n}.png" for n in names])
    class_names = (run.root / "classes.txt").read_text().split()
    rows = read_csv(out / "classes.csv")
    assert [r["image"] for r in rows] == names
    for n, r in zip(names, rows):
        with Image.open(photos / sources[n]) as im:
            rgb = np.array(im.convert("RGB"))
        labels = check_mask(out / f"{n}.png", (rgb.shape[1], rgb.shape[0]))
        found = [class_names[c] for c in np.unique(labels) if c != 0]
        assert r["classes"] == ";".join(found)
        with Image.open(out / "overlays" / f"{n}.png") as im:
            assert im.mode == "RGB" and im.size == (rgb.shape[1], rgb.shape[0])
            overlay = np.array(im)
        bkg = labels == 0
        if n != "a":  # lossless sources: the overlay is the image wherever the mask is background
            np.testing.assert_array_equal(overlay[bkg], rgb[bkg])
    assert ImageFolder(photos, recursive=True, exclude=out).names == names
    assert ImageFolder(photos).names == ["a"]


def test_interrupted_export_resumes_without_rewriting(run, tmp_path, monkeypatch):
    import wsss.eval.export as export

    out = tmp_path / "resume"
    cfg = load_config(run.cfg)
    real, calls = export.write_atomic, {"n": 0}

    def dies_at_the_third(path, image):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C mid-way
        return real(path, image)

    monkeypatch.setattr(export, "write_atomic", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        export.export_predictions(cfg, run.ckpt, out, split="train", protocol="E3", limit=6)
    first = sorted(out.glob("*.png"))
    assert [p.name for p in first] == ["train_00000.png", "train_00001.png"]
    stamps = {p.name: p.stat().st_mtime_ns for p in first}
    stale = out / ".train_00002.png.999.partial"  # a half-written file of a killed run
    stale.write_bytes(b"\x89PNG half")
    p = infer(run, "--out", out, "--split", "train", "--protocol", "E3", "--limit", 6)
    assert sorted(f.name for f in out.glob("*.png")) == [f"train_{i:05d}.png" for i in range(6)]
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps  # not written again
    assert not stale.exists()
    assert "4 images written, 2 already there (skipped)" in p.stderr
    assert len(read_csv(out / "classes.csv")) == 6


def test_errors_name_every_problem(run, tmp_path, capsys):
    from wsss.infer.__main__ import main

    p = infer(run, "--out", tmp_path / "x", "--split", "nosuchsplit", "--protocol", "E9", expect=2)
    assert "Traceback" not in p.stderr
    assert "nosuchsplit.txt" in p.stderr and "--protocol E9: unknown for model.method=more" in p.stderr
    missing_ckpt = ["--cfg", str(run.cfg), "--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")]
    assert main(missing_ckpt + ["--split", "val"]) == 2
    assert f"--ckpt='{tmp_path / 'none.pt'}': file not found" in capsys.readouterr().err
    base = ["--cfg", str(run.cfg), "--ckpt", str(run.ckpt), "--out", str(tmp_path / "x")]
    cases = [
        (["--split", "val", "--protocol", "E3", "--row", "par"], "--row par: protocol E3 has rows raw, crf"),
        (["--images", str(tmp_path / "nowhere")], "image folder not found"),
        (["--images", str(run.root / "JPEGImages"), "--protocol", "E1-CAM"], "uses ground-truth image-level labels"),
        (["--split", "test", "--protocol", "E1-LAM", "--row", "par"], "has none for 'test_00000'"),
        (["--images", str(run.root / "JPEGImages"), "--voc-server"], "--voc-server"),
    ]
    for args, message in cases:
        assert main(base + args) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "x").exists()  # nothing written before the checks pass


def test_torchrun_two_processes_shard_and_match_one(run, tmp_path):
    from wsss.data.folder import split_images
    from wsss.eval.evaluate import load_model
    from wsss.methods import get_method

    out = tmp_path / "ddp"
    p = infer(run, "--out", out, "--split", "train", "--protocol", "E1-CAM", "--row", "raw", world=2)
    assert "8 images written, 0 already there (skipped)" in p.stderr and "2 process(es)" in p.stderr
    cfg = load_config(run.cfg)
    model, _ = load_model(cfg, run.ckpt, torch.device("cpu"))
    export = get_method("more").exports(cfg)["E1-CAM"]
    ds = split_images("voc", run.root, "train")
    assert [r["image"] for r in read_csv(out / "classes.csv")] == ds.names
    for i, n in enumerate(ds.names):
        labels = check_mask(out / f"{n}.png", image_size(run.root / "JPEGImages" / f"{n}.jpg"))
        one = export.predict(model, [ds[i]], torch.device("cpu"), "raw")[0].numpy()
        assert (labels == one).mean() > 0.99  # threads differ (1 vs 2): float sums may flip a pixel
