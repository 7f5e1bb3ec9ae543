"""AReAM's official training recipe (SPEC §5 "Training details of the official
main_voc_mctformer.py"): the VOC config key by key, timm's augmentation (reproducible per item),
timm's optimizer groups, the per-epoch cosine schedule (and its exact resume), stochastic depth
in the pseudo-label pass, the per-epoch val mAP with checkpoint_best.pt, and the offline layer
entropies of ent_voc_mctformer.py."""
import csv
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.config import OptimConfig, load_config
from wsss.data.synthetic import make_synthetic_dataset
from wsss.eval.multilabel import average_precision, mean_image_average_precision
from wsss.models import AReAM
from wsss.train.optim import build_optimizer

from test_train import TINY

REPO = Path(__file__).resolve().parents[1]
VOC_TRAIN_AUG = 10582  # SPEC §1: train_aug images


def _tiny_aream(**kw):
    return AReAM(3, backbone="custom", embed_dim=24, depth=2, num_heads=2, patch_size=8, img_size=16, **kw)


# -- the config ------------------------------------------------------------------------------

def test_voc_aream_config_is_the_spec_recipe():
    cfg = load_config(REPO / "configs" / "voc_aream.yaml")
    # SPEC §5 "Training details" and "Training (MCTformer, official run script)"
    assert cfg.model.method == "aream"
    assert cfg.model.backbone == "deit_small_patch16_224"
    assert cfg.data.train_split == "train_aug" and cfg.data.val_split == "val"
    assert cfg.data.aug == "timm" and cfg.data.crop_size == 224
    assert cfg.model.drop_path == 0.1
    assert cfg.optim.groups == "no_decay"
    assert cfg.optim.lr == 5e-4 and cfg.optim.lr_base_batch == 512
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.eps == 1e-8
    assert cfg.optim.schedule == "cosine_epoch"
    assert cfg.optim.warmup_epochs == 5 and cfg.optim.warmup_lr == 1e-6 and cfg.optim.min_lr == 1e-5
    assert cfg.train.batch_size == 64
    per_epoch = VOC_TRAIN_AUG // 64
    assert cfg.train.max_iters == 60 * per_epoch  # 60 epochs
    assert round(cfg.aream.aff_start * cfg.train.max_iters) == 10 * per_epoch  # cls_epochs 10
    assert cfg.aream.layer_index == 7
    assert cfg.aream.score_l == 0.35 and cfg.aream.score_h == 0.55
    assert cfg.aream.w_aff == 0.1
    assert cfg.aream.entropy == "offline"
    assert cfg.aream.scales == [1.0]  # scale 1.0 + flip
    assert cfg.aream.epoch_map is True  # per-epoch val mAP -> checkpoint_best
    from wsss.train.optim import scaled_lr

    assert scaled_lr(cfg.optim, 64) == pytest.approx(5e-4 * 64 / 512)


def test_timm_transform_arguments_are_the_spec_call():
    from wsss.data.timm_transforms import TIMM_TRAIN_ARGS

    assert TIMM_TRAIN_ARGS == dict(is_training=True, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
                                   interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)


# -- augmentation ----------------------------------------------------------------------------

def test_timm_transform_is_timms_and_has_the_interface():
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation

    from wsss.data.transforms import TrainTransform

    t = TrainTransform(48, mode="timm")
    ops = t._timm.transform.transforms
    kinds = [type(o) for o in ops]
    assert RandomResizedCropAndInterpolation in kinds and RandAugment in kinds and RandomErasing in kinds
    rrc = next(o for o in ops if isinstance(o, RandomResizedCropAndInterpolation))
    assert rrc.scale == (0.08, 1.0) and rrc.size == (48, 48)
    erase = next(o for o in ops if isinstance(o, RandomErasing))
    assert erase.probability == 0.25 and erase.mode == "pixel" and erase.max_count == 1
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    x, valid, label = t(image, np.random.default_rng(1))
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    assert valid.shape == (48, 48) and valid.dtype == torch.bool and bool(valid.all()) and label is None
    with pytest.raises(ValueError, match="segmentation labels"):
        t(image, np.random.default_rng(1), label=np.zeros((70, 90), np.uint8))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), seed=5, num_train=12, num_val=3, size=64,
                                  num_classes=3)


def test_timm_augmentation_reproducible_per_seed_epoch_index(data_root):
    from wsss.data import VOCClassification

    ds = VOCClassification(data_root, "train", crop_size=32, aug="timm", seed=7)
    py, npy, th = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    a = ds[3]["image"]
    # the global streams are restored: the caller's random numbers do not depend on the loader
    assert random.getstate() == py and np.array_equal(np.random.get_state()[1], npy)
    assert torch.equal(torch.get_rng_state(), th)
    random.random(), np.random.rand(), torch.rand(3)  # other consumers of the global RNGs in between
    assert torch.equal(ds[3]["image"], a)
    assert not torch.equal(ds[4]["image"], a)
    ds.set_epoch(1)
    b = ds[3]["image"]
    assert not torch.equal(b, a)
    other = VOCClassification(data_root, "train", crop_size=32, aug="timm", seed=7)
    other.set_epoch(1)
    assert torch.equal(other[3]["image"], b)
    assert not torch.equal(VOCClassification(data_root, "train", crop_size=32, aug="timm", seed=8)[3]["image"], a)


# -- optimizer and schedule ------------------------------------------------------------------

RECIPE_OPTIM = dict(lr=5e-4, lr_base_batch=512, weight_decay=0.05, eps=1e-8, groups="no_decay",
                    schedule="cosine_epoch", warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)


def test_no_decay_groups_on_a_tiny_aream():
    model = _tiny_aream()
    opt, _ = build_optimizer(model, OptimConfig(**RECIPE_OPTIM), 60, iters_per_epoch=1, global_batch=64)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["eps"] == 1e-8 and opt.defaults["betas"] == (0.9, 0.999)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert set(groups) == {0.0, 0.05}
    blocks = [f"backbone.blocks.{i}." for i in range(2)]
    assert groups[0.0] == sorted(
        ["backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.bias", "head.bias"]
        + [b + s for b in blocks for s in ("norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias",
                                           "norm2.weight", "norm2.bias", "mlp.fc1.bias", "mlp.fc2.bias")])
    assert groups[0.05] == sorted(
        ["backbone.patch_embed.proj.weight", "head.weight"]
        + [b + s for b in blocks for s in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight",
                                           "mlp.fc2.weight")])
    assert model.no_weight_decay() == {"backbone.pos_embed", "backbone.cls_token"}


def test_model_groups_path_unchanged():
    """optim.groups=model (MoRe's default): the model's groups, head_lr_mult, one weight decay."""
    model = _tiny_aream()
    cfg = OptimConfig(lr=1e-4, head_lr_mult=10.0, weight_decay=0.01)
    opt, sched = build_optimizer(model, cfg, 100)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert [len(g["params"]) for g in opt.param_groups] == [len(g) for g in model.param_groups()]
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-4, 1e-3])
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)


def _timm_cosine(t, base, epochs=60, warmup=5, warmup_lr=1e-6, min_lr=1e-5):
    """timm's CosineLRScheduler value at epoch t (warmup_prefix False, one cycle), by hand."""
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / epochs))


def _lr_run(per_epoch, max_iters, start=0, stop=None, state=None):
    w = torch.nn.Parameter(torch.zeros(3))
    model = torch.nn.Module()
    model.w = w
    opt, sched = build_optimizer(model, OptimConfig(**RECIPE_OPTIM), max_iters, iters_per_epoch=per_epoch,
                                 global_batch=64)
    if state is not None:
        opt.load_state_dict(state[0])
        sched.load_state_dict(state[1])
    lrs = []
    for _ in range(start, max_iters if stop is None else stop):
        lrs.append(opt.param_groups[0]["lr"])  # the lr of this iteration's update
        opt.step()
        sched.step()
    return lrs, opt, sched


def test_epoch_cosine_lr_by_hand_and_exact_resume():
    per_epoch, epochs = 7, 60
    max_iters = per_epoch * epochs
    base = 5e-4 * 64 / 512
    lrs, _, _ = _lr_run(per_epoch, max_iters)
    # the official loop steps the scheduler with the finished epoch's index: epoch e trains at t = max(e-1, 0)
    for i in range(max_iters):
        assert lrs[i] == pytest.approx(_timm_cosine(max(i // per_epoch - 1, 0), base), rel=1e-12), i
    assert lrs[0] == lrs[2 * per_epoch - 1] == pytest.approx(1e-6)  # epochs 0 and 1 at warmup_lr
    assert lrs[2 * per_epoch] == pytest.approx(1e-6 + (base - 1e-6) / 5)  # epoch 2: first warm-up step
    assert lrs[6 * per_epoch] == pytest.approx(1e-5 + 0.5 * (base - 1e-5) * (1 + math.cos(math.pi * 5 / 60)))
    assert lrs[-1] == pytest.approx(1e-5 + 0.5 * (base - 1e-5) * (1 + math.cos(math.pi * 58 / 60)))
    assert len(set(lrs[3 * per_epoch:4 * per_epoch])) == 1  # constant within an epoch

    # resume mid-epoch from the saved optimizer + scheduler states: the same lrs follow
    k = 3 * per_epoch + 4
    _, opt, sched = _lr_run(per_epoch, max_iters, stop=k)
    state = (opt.state_dict(), sched.state_dict())
    resumed, _, _ = _lr_run(per_epoch, max_iters, start=k, state=state)
    assert resumed == lrs[k:]


# -- stochastic depth in the pseudo-label pass -------------------------------------------------

def test_pseudo_label_pass_keeps_train_mode_and_drop_path():
    from wsss.cam import multi_scale_aream_cam
    from wsss.methods.aream import AReAMLosses

    torch.manual_seed(0)
    model = _tiny_aream(drop_path_rate=0.5).train()
    cfg = load_config(None, TINY + ["model.method=aream", "aream.entropy=none", "aream.layer_index=1",
                                    "cam.par_dilations=[1]", "cam.par_iters=1"])
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    images, y = torch.randn(2, 3, 16, 16), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    labels = AReAMLosses(cfg, "cpu").pseudo_labels(model, images, y, torch.ones(2, 16, 16, dtype=torch.bool), cfg)
    assert labels.shape == (2, 16, 16) and seen and all(seen) and model.training
    # drop path is live there: two passes differ in train mode, not in eval mode
    a = multi_scale_aream_cam(model, images, (1.0,), 1, None, impl="reference")
    b = multi_scale_aream_cam(model, images, (1.0,), 1, None, impl="reference")
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(multi_scale_aream_cam(model, images, (1.0,), 1, None, impl="reference"),
                               multi_scale_aream_cam(model, images, (1.0,), 1, None, impl="reference"))


# -- mAP -------------------------------------------------------------------------------------

def test_average_precision_hand_cases():
    # ranking 0.9(+) 0.8(-) 0.5(-) 0.3(+): precision 1, 1/2, 1/3, 2/4 at recall 1/2, 1/2, 1/2, 1
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.3, 0.5]) == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    # tied scores form one threshold: {0.5: one + one -} then 0.2(+): P 1/2 at R 1/2, P 2/3 at R 1
    assert average_precision([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert average_precision([0, 1, 0], [0.1, 0.9, 0.2]) == 1.0
    assert average_precision([1, 1], [0.3, 0.3]) == 1.0
    with pytest.raises(ValueError, match="positive"):
        average_precision([0, 0], [0.1, 0.2])


def test_mean_image_average_precision_skips_unlabelled_images():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0]])
    labels = [[0, 0, 1], [1, 0, 1], [0, 0, 0]]  # the third image has no label: left out
    items = [{"image_uint8": torch.full((4, 4, 3), i, dtype=torch.uint8),
              "cls_label": torch.tensor(y, dtype=torch.float32)} for i, y in enumerate(labels)]

    def predict(x):  # the image's constant value is its index
        return logits[x[:, 0, 0, 0].round().long()]

    def transform(pil):
        return torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()

    # image 0: 3rd class ranked last -> P 1/3 at R 1; image 1: ranking c1(-), c2(+), c0(+) -> 1/2, 2/3
    expected = (1 / 3 + (0.5 * 0.5 + 0.5 * 2 / 3)) / 2
    for bs in (1, 2, 8):
        assert mean_image_average_precision(predict, items, transform, "cpu", batch_size=bs) == pytest.approx(expected)


# -- training: per-epoch mAP, checkpoint_best, exact resume ----------------------------------

def _metrics(run_dir, name):
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == name}


def test_epoch_map_checkpoint_best_and_resume(data_root, tmp_path):
    from wsss.train.loop import train
    from wsss.utils.checkpoint import load_checkpoint

    # 12 train images, batch 4 -> 3 iterations per epoch; 3 epochs, warm-up 1 epoch
    recipe = TINY + ["model.method=aream", "aream.layer_index=1", "aream.aff_start=0.34", "aream.entropy=none",
                     "data.aug=timm", "data.crop_size=32", "model.img_size=32", "model.drop_path=0.1",
                     "optim.groups=no_decay", "optim.schedule=cosine_epoch", "optim.lr=5e-4",
                     "optim.lr_base_batch=512", "optim.warmup_epochs=1", "optim.min_lr=1e-5",
                     "optim.warmup_lr=1e-6", "train.max_iters=9", "train.ckpt_interval=3",
                     "train.keep_checkpoints=true", f"data.root={data_root}"]
    full = tmp_path / "full"
    train(load_config(None, recipe + [f"run_dir={full}"]))
    maps = _metrics(full, "val/mAP")
    assert sorted(maps) == [3, 6, 9] and all(0.0 < v <= 1.0 for v in maps.values())
    best = load_checkpoint(full / "checkpoint_best.pt")
    step = max(maps, key=lambda s: (maps[s], -s))  # the first epoch reaching the maximum
    assert best["best"] == {"metric": "mAP", "value": pytest.approx(maps[step]), "step": step}
    assert best["step"] == step
    assert load_checkpoint(full / "checkpoint.pt")["best"]["step"] == step
    assert not list(full.glob("checkpoint_best.pt.tmp"))

    lrs = _metrics(full, "lr")  # logged after the step: the lr of the next iteration
    base = 5e-4 * 4 / 512
    for s, lr in lrs.items():
        assert lr == pytest.approx(_timm_cosine(max(s // 3 - 1, 0), base, epochs=3, warmup=1), rel=1e-6), s

    resumed = tmp_path / "resumed"
    train(load_config(None, recipe + [f"run_dir={resumed}", f"resume={full / 'checkpoint_000003.pt'}"]))
    a, b = _metrics(full, "loss/total"), _metrics(resumed, "loss/total")
    assert sorted(b) == [4, 5, 6, 7, 8, 9]
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-7), s
    assert _metrics(resumed, "lr") == {s: lrs[s] for s in b}
    assert _metrics(resumed, "val/mAP") == pytest.approx({s: maps[s] for s in (6, 9)})


# -- offline layer entropies -----------------------------------------------------------------

class _HandAttention(torch.nn.Module):
    """A 'model' whose CAM and per-layer q, k are set by hand (2 layers, 1 head, dh = 4)."""

    depth, patch_size, attn_scale, num_classes = 2, 8, 1.0, 2

    def __init__(self, cam):
        super().__init__()
        self.cam, self.calls = cam, []

    def cam_and_qk(self, x):
        self.calls.append((tuple(x.shape), self.training))
        C, (h, w) = self.cam.shape[1], self.cam.shape[-2:]
        T = C + h * w
        q0, k0 = torch.zeros(1, 1, T, T), torch.randn(1, 1, T, T)  # logits 0: uniform over all T keys
        q1, k1 = 60.0 * torch.eye(T)[None, None], torch.eye(T)[None, None]  # ~identity attention
        return self.cam, torch.stack([q0, q1]), torch.stack([k0, k1])


def test_entropy_procedure_on_hand_made_attention():
    from wsss.tools.layer_entropy import compute_layer_entropy

    h, w = 2, 2
    cam = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[5.0, 0.0], [0.0, 0.0]]]])  # raw, max 3 and 5
    model = _HandAttention(cam).train()
    items = [{"image": torch.zeros(3, 16, 16), "cls_label": torch.tensor([1.0, 0.0])}]
    ent = compute_layer_entropy(model, items, "cpu", impl="reference")
    assert model.calls == [((1, 3, 16, 16), False)]  # eval mode
    # layer 0: every position gets the same value -> uniform -> log2(N) bits
    assert ent[0].item() == pytest.approx(math.log2(h * w), abs=1e-5)
    # layer 1: the raw CAM of the present class (not normalised), soft-maxed over positions
    p = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64).softmax(0)
    assert ent[1].item() == pytest.approx(float(-(p * p.log2()).sum()), abs=1e-4)
    p_norm = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64).div(3 + 1e-5).softmax(0)
    assert abs(ent[1].item() - float(-(p_norm * p_norm.log2()).sum())) > 0.1  # normalising would differ


def test_entropy_tool_reads_no_masks_and_follows_the_procedure(tmp_path):
    """The tool on a data set without any segmentation mask, against the procedure written out
    with the backbone's attention logits: images resized to size×size bicubic, eval mode, raw CAM."""
    import json

    from wsss.data.transforms import normalize
    from wsss.tools.layer_entropy import main as entropy_main

    root = make_synthetic_dataset(tmp_path / "syn", seed=1, num_train=3, num_val=1, size=40, num_classes=3)
    for d in ("SegmentationClassAug", "SegmentationClass"):
        shutil.rmtree(root / d)
    torch.manual_seed(0)
    model = _tiny_aream(drop_path_rate=0.3)
    ckpt = tmp_path / "cls.pt"
    torch.save({"model": model.state_dict(), "num_classes": 3}, ckpt)
    overrides = ["model.method=aream", "model.backbone=custom", "model.embed_dim=24", "model.depth=2",
                 "model.num_heads=2", "model.patch_size=8", "model.img_size=16", "model.drop_path=0.3",
                 f"data.root={root}", "data.train_split=train", "data.crop_size=24", "device=cpu",
                 "impl=reference"]
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("{}\n")
    out = tmp_path / "ent.json"
    assert entropy_main(["--cfg", str(cfg_file), "--ckpt", str(ckpt), "--out", str(out), *overrides]) == 0
    record = json.loads(out.read_text())
    assert record["size"] == 24 and record["images"] == 3

    model.eval()
    names = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    labels = np.load(root / "cls_labels_onehot.npy", allow_pickle=True).item() if (
        root / "cls_labels_onehot.npy").is_file() else np.load(root / "cls_labels.npy", allow_pickle=True).item()
    total = torch.zeros(2, dtype=torch.float64)
    for name in names:
        with Image.open(root / "JPEGImages" / f"{name}.jpg") as im:
            x = normalize(np.asarray(im.convert("RGB").resize((24, 24), Image.BICUBIC)))[None]
        with torch.no_grad():
            out_ = model.backbone(x, aux_layer=-1, attn_layers=range(2))
            cam = torch.relu(model(x).cam)[0].flatten(1).double()  # (C,N) raw
        y = torch.tensor(labels[name]) > 0
        for layer in range(2):
            A = (out_.attn_logits[layer][0].double() * model.attn_scale).softmax(-1).mean(0)[3:, 3:]  # (N,N)
            s = (cam[y] @ A.T).sum(0)
            p = s.softmax(0)
            total[layer] += -(p * p.log2()).sum()
    assert record["entropy_bits"] == pytest.approx((total / len(names)).tolist(), abs=1e-4)
