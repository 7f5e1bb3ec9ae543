"""Every error message names what it is about (issue 18 item 3): each test below triggers one raise
site through the entry point a user hits (a function, ``load_config``, a data set constructor, a
checkpoint reader, ``train``/``evaluate``/``export_predictions``) and checks that the message
names the argument, config key or file path involved.

The raise sites covered elsewhere with a message check are not repeated here: config key and
type errors (test_config.py), data set paths (test_data.py, test_coco_layout.py), checkpoint
formats (test_checkpoint_formats.py), preflight problems (test_preflight.py), CRF argument checks
(test_crf.py, test_lattice.py, test_energy_loss.py)."""
import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.config import ConfigError, config_to_dict, load_config
from wsss.data import DatasetError, TrainTransform, VOCClassification, VOCSegmentation, load_cls_labels
from wsss.data.synthetic import make_synthetic_dataset

from test_train import TINY

C = 3  # classes of the synthetic set
SMALL = TINY + ["data.crop_size=32", "model.img_size=32", "model.num_reg_tokens=2"]


def esc(value) -> str:
    """``value`` as a literal inside a ``match`` pattern (paths, tuples, brackets)."""
    return re.escape(str(value))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), seed=0, num_train=4, num_val=2, size=32,
                                  num_classes=C)


@pytest.fixture
def copy(synth, tmp_path):
    """A private copy of the synthetic set that a test may damage."""
    return shutil.copytree(synth, tmp_path / "voc")


def _names(root, split):
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _cfg(root, run_dir, *extra):
    return load_config(None, SMALL + [f"data.root={root}", f"run_dir={run_dir}", *extra])


def _wsss_checkpoint(path, cfg, num_classes: int = C, drop=()):
    """A checkpoint as ``wsss.train`` writes it (random weights), without the entries ``drop``."""
    from wsss.models import build_model

    model = build_model(dataclasses.replace(cfg.model, pretrained=""), num_classes)
    sd = {k: v for k, v in model.state_dict().items() if k not in drop}
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "scaler": {},
                "step": 0, "config": config_to_dict(cfg), "num_classes": num_classes, "rng": []}, path)
    return path


# --- config -------------------------------------------------------------------------------------

def test_config_override_with_an_empty_key():
    with pytest.raises(ConfigError, match=esc("override '=5' has an empty key")):
        load_config(None, ["=5"])


def test_config_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {esc(missing)}"):
        load_config(missing)
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_itres: 5\n")
    with pytest.raises(ConfigError, match=f"^{esc(path)}: unknown key 'train.max_itres'"):
        load_config(path)


# --- data ---------------------------------------------------------------------------------------

def _coco_root(tmp_path, folders, name):
    """A COCO root with empty image ``folders`` and split ``other`` listing ``name``."""
    for f in folders:
        (tmp_path / "JPEGImages" / f).mkdir(parents=True)
    split = tmp_path / "ImageSets" / "Segmentation" / "other.txt"
    split.parent.mkdir(parents=True)
    split.write_text(f"{name}\n")
    return tmp_path, split


def _garbage_label(root):
    path = root / "SegmentationClassAug" / f"{_names(root, 'val')[0]}.png"
    path.write_bytes(b"\x89PNG garbage")
    return lambda: VOCSegmentation(root, "val")[0], f"cannot read segmentation label {esc(path)}"


def _one_class_name(root):
    path = root / "classes.txt"
    path.write_text("background\n")
    return lambda: VOCSegmentation(root, "val"), f"{esc(path)}: expected background plus at least one class name"


def _non_numeric_label(root):
    path = root / "labels.npy"
    np.save(path, {"img": "abc"}, allow_pickle=True)
    return lambda: load_cls_labels(path), f"{esc(path)}: label of 'img' is not numeric"


def _missing_label_file(root):
    path = root / "none.npy"
    return lambda: load_cls_labels(path), f"image-level label file not found: {esc(path)}"


def _empty_folder(root):
    from wsss.data.folder import ImageFolder

    folder = root / "empty"
    folder.mkdir()
    return lambda: ImageFolder(folder), rf"no image files \(.*\) in {esc(folder)}"


def _same_stem(root):
    from wsss.data.folder import ImageFolder

    folder = root / "pics"
    folder.mkdir()
    for ext in ("jpg", "png"):
        Image.new("RGB", (4, 4)).save(folder / f"a.{ext}")
    return lambda: ImageFolder(folder), f"{esc(folder / 'a.jpg')} and {esc(folder / 'a.png')} have the same name"


def _coco_readme_unknown_subset(root):
    from wsss.data import COCOSegmentation

    coco, split = _coco_root(root / "coco", ("train2014", "val2014"), "abc")
    return (lambda: COCOSegmentation(coco, "other"),
            rf"cannot tell whether 'abc' of split 'other' \({esc(split)}\) belongs to train2014 or val2014")


def _coco_public_unknown_folder(root):
    from wsss.data import COCOSegmentation

    coco, split = _coco_root(root / "coco", ("train", "val"), "000000000009")
    return (lambda: COCOSegmentation(coco, "other"),
            rf"cannot tell whether '000000000009' of split 'other' \({esc(split)}\) is in JPEGImages/train")


def _segmentation_set(*args):
    from wsss.data import build_segmentation_set

    return build_segmentation_set(*args)


def _split_images(*args):
    from wsss.data.folder import split_images

    return split_images(*args)


# (id, make(root) -> (call, pattern)): DatasetError naming the file / folder / split list
DATA_ERRORS = [
    ("segmentation-label-unreadable", _garbage_label),
    ("classes-txt-one-line", _one_class_name),
    ("cls-labels-not-numeric", _non_numeric_label),
    ("cls-labels-missing", _missing_label_file),
    ("image-folder-empty", _empty_folder),
    ("image-folder-same-stem", _same_stem),
    ("coco-readme-subset", _coco_readme_unknown_subset),
    ("coco-public-folder", _coco_public_unknown_folder),
]


@pytest.mark.parametrize("make", [m for _, m in DATA_ERRORS], ids=[i for i, _ in DATA_ERRORS])
def test_data_errors_name_the_path(copy, make):
    call, pattern = make(copy)
    with pytest.raises(DatasetError, match=pattern):
        call()


@pytest.mark.parametrize("build", [_segmentation_set, _split_images], ids=["build_segmentation_set", "split_images"])
def test_unknown_dataset_is_named(synth, build):
    with pytest.raises(ValueError, match=esc("unknown dataset 'imagenet'; valid: coco, voc")):
        build("imagenet", synth, "val")


@pytest.mark.parametrize("call, pattern", [
    (lambda root: VOCClassification(root, "train", crop_size=32, seed=-1), "seed must be >= 0, got -1"),
    (lambda root: VOCClassification(root, "train", crop_size=32).set_epoch(-2), "epoch must be >= 0, got -2"),
    (lambda root: VOCSegmentation(root, "val", resize=0), "resize must be None or a positive int, got 0"),
    (lambda root: TrainTransform(32, ignore_index=300), r"ignore_index must lie in 0\.\.255, got 300"),
    (lambda root: TrainTransform(32)(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0),
                                     label=np.full((8, 8), 300, np.int32)),
     r"label values must lie in 0\.\.255, got 300\.\.300"),
], ids=["seed", "set_epoch", "resize", "ignore_index", "label-values"])
def test_data_argument_errors_name_the_argument(synth, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(synth)


# --- tensors: cam, losses, metrics ----------------------------------------------------------------

def _token_inputs(B=2, Cc=3, D=8, h=2):
    return (torch.randn(B, Cc, D), torch.randn(B, D, h, h), torch.zeros(B, h, h, dtype=torch.long),
            torch.ones(B, Cc))


@pytest.mark.parametrize("loss_name", ["cle_loss", "une_loss"])
@pytest.mark.parametrize("argument, bad, pattern", [
    (1, torch.randn(2, 4, 2, 2), esc("patch_features must be (B=2,D=8,h,w), got (2, 4, 2, 2)")),
    (2, torch.zeros(2, 3, 3, dtype=torch.long), esc("label must be (B,h,w)=(2, 2, 2), got (2, 3, 3)")),
    (3, torch.ones(2, 4), esc("cls_label must be (B,C)=(2, 3), got (2, 4)")),
], ids=["patch_features", "label", "cls_label"])
def test_token_loss_shapes_name_the_argument(loss_name, argument, bad, pattern):
    import wsss.losses

    args = list(_token_inputs())
    args[argument] = bad
    with pytest.raises(ValueError, match=pattern):
        getattr(wsss.losses, loss_name)(*args)


def test_cam_argument_errors_name_the_argument():
    from wsss.cam import aream_refined_cam, cam_to_label, multi_scale_maps

    with pytest.raises(ValueError, match=r"cam must be a \(B,C,H,W\) tensor, got torch.Size\(\[3, 4\]\)"):
        cam_to_label(torch.zeros(3, 4), torch.ones(1, 3))
    with pytest.raises(ValueError, match="flip_merge must be 'max' or 'sum', got 'mean'"):
        multi_scale_maps(lambda x: x, torch.zeros(1, 3, 8, 8), [1.0], 8, flip_merge="mean")
    L, Cc, N = 3, 2, 4  # q, k (L,B,Hd,C+N,dh)
    q = torch.randn(L, 1, 2, Cc + N, 4)
    with pytest.raises(ValueError, match=esc("refine_weights (layer weights) must hold 3 values, got 2")):
        aream_refined_cam(torch.rand(1, Cc, 2, 2), q, q, 1, refine_weights=[1.0, 2.0], impl="reference")


def test_metric_argument_errors_name_the_argument():
    from wsss.eval.metrics import ConfusionMatrix
    from wsss.eval.multilabel import average_precision

    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="y_true and scores differ in length: 2 vs 1"):
        average_precision([1, 0], [0.5])
    with pytest.raises(ValueError, match="y_true has no positive label"):
        average_precision([0, 0], [0.1, 0.2])


def test_stream_names_the_predict_callable():
    from wsss.eval.engine import stream

    cfg = load_config(None, ["eval.batch_size=2", "data.num_workers=0"])
    with pytest.raises(RuntimeError, match="predict returned 0 results for a batch of 2"):
        stream([{"i": i} for i in range(3)], range(3), lambda batch: [], lambda item, r: None, cfg, "cpu",
               crf=False)


def test_dense_crf_batch_refuses_arrays():
    """wsss.crf is being rewritten: tell its owner if this message changes."""
    from wsss.crf import dense_crf_batch

    with pytest.raises(TypeError, match="images and probs must be tensors"):
        dense_crf_batch(np.zeros((1, 3, 4, 4), np.uint8), torch.ones(1, 2, 4, 4))


# --- models and checkpoints ---------------------------------------------------------------------

AREAM_TINY = dict(backbone="custom", embed_dim=24, depth=3, num_heads=2, patch_size=8, img_size=32)


def test_aream_model_arguments(tmp_path):
    from wsss.models import AReAM

    with pytest.raises(ValueError, match=esc("num_classes must be >= 1 (foreground classes), got 0")):
        AReAM(0, **AREAM_TINY)
    model = AReAM(2, **AREAM_TINY)
    with pytest.raises(ValueError, match=esc("entropy mode (aream.entropy) must be offline, online or none, got 'bogus'")):
        model.layer_weights("bogus")
    with pytest.raises(ValueError, match="layout must be 'joint' or 'split', got 'bogus'"):
        model.official_state_dict(layout="bogus")
    path = tmp_path / "entropy.json"
    path.write_text(json.dumps({"bits": [1.0, 2.0, 3.0]}))
    with pytest.raises(ValueError, match=f"{esc(path)}: not a layer-entropy file"):
        model.load_layer_entropy(path)


def test_pos_embed_grid_names_pos_embed():
    from wsss.models.vit import pretrain_grid_from_pos_embed

    with pytest.raises(ValueError, match="pos_embed with 7 positions and 1 tokens does not hold a square"):
        pretrain_grid_from_pos_embed(torch.zeros(1, 7, 4), 1)


D, P = 32, 8  # width and patch of the hand-made official checkpoints


def _official_aream(layout: str, class_positions: int = 3, patches: int = 16) -> dict:
    sd = {"cls_token": torch.zeros(1, 3, D), "head.weight": torch.zeros(3, D, 3, 3),
          "patch_embed.proj.weight": torch.zeros(D, 3, P, P)}
    if layout == "split":
        return {**sd, "pos_embed_cls": torch.zeros(1, class_positions, D), "pos_embed_pat": torch.zeros(1, patches, D)}
    return {**sd, "pos_embed": torch.zeros(1, class_positions + patches, D)}


CHECKPOINT_ERRORS = [  # (id, file content, config overrides, message after "<path>: read as ..., but ...")
    ("aream-class-positions", _official_aream("split", class_positions=4), ["model.method=aream", "model.num_heads=2"],
     esc("class count: pos_embed_cls (1, 4, 32) holds 4 class positions, head.weight has 3 classes")),
    ("aream-patch-grid", _official_aream("joint", patches=15), ["model.method=aream", "model.num_heads=2"],
     "pos_embed after its 3 class positions: 15 patch positions do not form a square grid"),
    ("more-num-heads", {"encoder.cls_token": torch.zeros(1, 5, D), "classifier.weight": torch.zeros(3, D, 1, 1)},
     ["model.method=more"], "cannot tell the number of attention heads of a width-32 checkpoint; set model.num_heads"),
    ("wsss-no-classes", {"backbone.cls_token": torch.zeros(1, 1, D)}, ["model.method=more"],
     "the checkpoint records no num_classes and has neither classifier.weight nor head.weight"),
]


@pytest.mark.parametrize("content, overrides, pattern", [c[1:] for c in CHECKPOINT_ERRORS],
                         ids=[c[0] for c in CHECKPOINT_ERRORS])
def test_trained_model_errors_name_the_file(tmp_path, content, overrides, pattern):
    from wsss.models.checkpoints import load_trained_model

    path = tmp_path / "ckpt.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=rf"^{esc(path)}: read as .*, but it does not fit: {pattern}"):
        load_trained_model(path, load_config(None, overrides).model)


def test_checkpoint_readers_name_the_file(tmp_path):
    from wsss.models.checkpoints import checkpoint_format, load_trained_model
    from wsss.utils.checkpoint import load_checkpoint, read_torch_file

    missing = tmp_path / "none.pt"
    for read in (lambda p: load_trained_model(p, load_config(None, []).model), read_torch_file, load_checkpoint):
        with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {esc(missing)}"):
            read(missing)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.zeros(4)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])  # an interrupted copy: no zip directory
    with pytest.raises(ValueError, match=f"cannot read checkpoint {esc(truncated)}: PytorchStreamReader"):
        read_torch_file(truncated)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=f"cannot read safetensors file {esc(bad)}"):
        load_trained_model(bad, load_config(None, []).model)
    with pytest.raises(ValueError, match=esc("no known checkpoint layout fits its keys ['layer.w']")):
        checkpoint_format({"layer.w": torch.zeros(2)})


# --- methods, tools, training, evaluation -------------------------------------------------------

def test_aream_entropy_momentum_names_the_key():
    from wsss.methods import get_method

    cfg = load_config(None, ["model.method=aream", "aream.entropy=online", "aream.entropy_momentum=1.0"])
    with pytest.raises(ValueError, match=esc("aream.entropy_momentum must be in [0, 1), got 1.0")):
        get_method("aream").objective(cfg, "cpu")


def test_ablation_errors_name_the_method_and_variant(tmp_path):
    from wsss.tools.ablation import run_ablation

    with pytest.raises(ValueError, match="needs model.method=more or aream, the config has 'baseline'"):
        run_ablation(None, ["model.method=baseline", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="unknown variant 'bogus'; valid: "):
        run_ablation(None, ["model.method=more", f"run_dir={tmp_path}"], variants=["bogus"])
    assert not (tmp_path / "ablation").exists()


def test_argument_checks_of_helpers_name_the_argument():
    from wsss.tools.layer_entropy import ResizedImages
    from wsss.train.optim import EpochSchedule

    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        ResizedImages(None, 0)
    with pytest.raises(ValueError, match="iters_per_epoch must be >= 1, got 0"):
        EpochSchedule(None, 0)


def test_resume_with_weights_that_do_not_fit(synth, tmp_path):
    from wsss.train.loop import train

    cfg = _cfg(synth, tmp_path / "run", "model.method=baseline")
    ckpt = _wsss_checkpoint(tmp_path / "old.pt", cfg, drop=("classifier.weight",))
    with pytest.raises(ValueError, match=rf"resume={esc(ckpt)}: the checkpoint's weights do not fit the model; "
                                         r"missing \['classifier\.weight'\]"):
        train(dataclasses.replace(cfg, resume=str(ckpt)))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_replica_divergence_shows_the_checksums(monkeypatch):
    """Only a multi-process run reaches this check; two ranks are simulated with a fake all_gather."""
    import wsss.train.loop as loop

    monkeypatch.setattr(loop.dist, "get_world_size", lambda: 2)

    def all_gather(out, local):
        out[0].copy_(local)
        out[1].copy_(local + 1)

    monkeypatch.setattr(loop.dist, "all_gather", all_gather)
    with pytest.raises(RuntimeError, match=r"DDP replicas diverged: parameter checksums \[\["):
        loop._check_replicas_in_sync(torch.nn.Linear(2, 1))


@pytest.fixture(scope="module")
def five_class_ckpt(synth, tmp_path_factory):
    """A MoRe checkpoint of 5 classes, for the 3-class synthetic set."""
    tmp = tmp_path_factory.mktemp("five")
    return _wsss_checkpoint(tmp / "five.pt", _cfg(synth, tmp), num_classes=5)


def test_export_class_count_names_the_checkpoint_and_split(synth, tmp_path, five_class_ckpt):
    from wsss.eval.export import export_predictions
    from wsss.utils.preflight import PreflightError

    with pytest.raises(PreflightError, match=rf"--ckpt={esc(five_class_ckpt)} has 5 classes but split 'val' of "
                                             rf"data.root={esc(synth)} has 3"):
        export_predictions(_cfg(synth, tmp_path), five_class_ckpt, tmp_path / "out", split="val", protocol="E3")


def test_evaluate_class_count_names_the_data_root(synth, tmp_path, five_class_ckpt):
    from wsss.eval.evaluate import evaluate

    with pytest.raises(ValueError, match=rf"--ckpt={esc(five_class_ckpt)} has 5 classes but data.root={esc(synth)} "
                                         rf"\(val split\) has 3"):
        evaluate(_cfg(synth, tmp_path, "eval.protocols=[E3]"), five_class_ckpt)


def test_lam_protocol_without_gcr_names_the_key(synth, tmp_path):
    from wsss.eval.evaluate import evaluate

    cfg = _cfg(synth, tmp_path, "model.method=more", "model.gcr=false", "eval.protocols=[E1-LAM]")
    ckpt = _wsss_checkpoint(tmp_path / "nogcr.pt", cfg)
    # refused with the other preflight problems, before the model is loaded or an image read
    from wsss.utils.preflight import PreflightError

    with pytest.raises(PreflightError, match=esc("eval.protocols: E1-LAM reads the LAM, which needs a MoRe model with GCR "
                                             "(model.gcr=true); without it: E1-CAM, E3, extra-CAM")):
        evaluate(cfg, ckpt)


def test_pretrained_file_without_a_square_patch_grid_names_the_file(tmp_path):
    from wsss.models.vit import build_backbone, load_pretrained_vit

    vit = build_backbone("custom", embed_dim=24, depth=1, num_heads=2, patch_size=8, img_size=32)
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    sd["cls_token"] = torch.zeros(1, 1, 24)
    sd["pos_embed"] = torch.zeros(1, 1 + 10, 24)  # 10 patch positions: no square grid
    path = tmp_path / "odd_vit.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=rf"{esc(path)}: pos_embed with 11 positions and 1 tokens does not hold a "
                                         "square patch grid"):
        load_pretrained_vit(vit, path)


def test_layer_entropy_negative_size_names_the_option(tmp_path, capsys):
    from wsss.tools.layer_entropy import main

    with pytest.raises(SystemExit) as e:
        main(["--cfg", "configs/demo_aream.yaml", "--ckpt", str(tmp_path / "x.pt"), "--size", "-3"])
    assert e.value.code == 2
    assert "--size must be >= 0 (0 = data.crop_size), got -3" in capsys.readouterr().err
