"""The COCO recipe of the published MoRe run (SPEC §3.0, §7) as configs/coco.yaml states it:
every value key by key against literals copied from the SPEC text, the staged losses at their
boundary iterations (and VOC's single stage in the same form), the ``coco`` augmentation, and
the shrunk recipe trained by two gloo processes through every stage."""
import csv
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from wsss.config import ConfigError, load_config
from wsss.data.synthetic import make_synthetic_dataset
from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform
from wsss.methods import Schedule
from wsss.methods.more import active_weights

from test_train import TINY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COCO_YAML = CONFIGS / "coco.yaml"
VOC_YAML = CONFIGS / "voc.yaml"


def _iters(fraction: float, max_iters: int) -> int:
    return int(round(fraction * max_iters))


# -- the values SPEC §3.0 / §7 name -------------------------------------------------------------

def test_coco_yaml_states_every_value_of_the_published_run():
    cfg = load_config(COCO_YAML)
    n = cfg.train.max_iters
    d, m, o, t, lo, c, e = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.loss, cfg.cam, cfg.eval
    # data (§1, §3.0): COCO, train / val_part, 448 crops, the COCO augmentation
    assert (d.dataset, d.train_split, d.val_split, d.crop_size, d.aug) == ("coco", "train", "val_part", 448, "coco")
    # network (§2, §7): ViT-B/16 with 4 regularisation tokens (+ 80 class tokens), aux layer -3, GCR
    assert (m.method, m.backbone, m.num_reg_tokens, m.aux_layer, m.gcr) == ("more", "vit_base_patch16_224", 4, -3, True)
    # schedule (§3.0, §3.7, §7): 80 000 iterations, batch 4 per GPU, warm-up 1 500, cam2mask 50 000,
    # validation every 4 000 from 60 000
    assert (n, t.batch_size) == (80000, 4)
    assert _iters(o.warmup, n) == 1500
    assert _iters(t.cam2mask, n) == 50000
    assert t.eval_interval == 4000 and _iters(t.eval_start, n) == 60000
    # optimiser (§3.7, §7): lr 6e-5, heads 10x, AdamW 0.9/0.999, eps 1e-8, wd 0.01, warmup ratio 1e-6, power 0.9
    assert (o.lr, o.head_lr_mult, o.betas, o.eps, o.weight_decay) == (6e-5, 10.0, [0.9, 0.999], 1e-8, 0.01)
    assert (o.schedule, o.warmup_ratio, o.power) == ("poly", 1e-6, 0.9)
    # loss weights (§3.0: the published run's log) and temperatures (CLE 0.1, token 0.07)
    assert (lo.w_ptc, lo.w_cle, lo.w_une, lo.w_seg, lo.w_reg) == (0.3, 0.05, 0.0, 0.12, 0.05)
    assert (lo.w_aux, lo.w_tok) == (1.0, 1.0)
    assert (lo.cle_temp, lo.tok_temp) == (0.1, 0.07)
    # thresholds (§3.0): bkg 0.45 / high 0.65 / low 0.25 (refined labels, Laux, ptc);
    # Lcle high 0.5 (low 0.25), Lmain 0.6 / 0.35 as on VOC
    assert (c.bkg_thre, c.high_thre, c.low_thre) == (0.45, 0.65, 0.25)
    assert (lo.cle_high, lo.cle_low, lo.main_high, lo.main_low) == (0.5, 0.25, 0.6, 0.35)
    # CAM scales (§3.0) and PAR (§3.1)
    assert c.scales == [1.0, 0.5, 0.75, 1.25, 1.5]
    assert (c.par_dilations, c.par_iters) == ([1, 2, 4, 8, 12, 24], 10)
    # energy loss (§6.1, §7): 1e-7, σ_rgb 15, σ_xy 100, scale 0.5
    assert (lo.reg_weight, lo.reg_sigma_rgb, lo.reg_sigma_xy, lo.reg_scale) == (1e-7, 15.0, 100.0, 0.5)
    # evaluation CRF (§4, §7): t=10, 1/3/67/3/4
    assert (e.crf_iters, e.crf_pos_xy_std, e.crf_pos_w, e.crf_bi_xy_std, e.crf_bi_rgb_std, e.crf_bi_w) == \
        (10, 1.0, 3.0, 67.0, 3.0, 4.0)
    assert cfg.seed == 0
    # 2 GPUs: a launch property, stated in the header as the command to run
    assert "torchrun --nproc_per_node=2" in COCO_YAML.read_text().split("\ndata:")[0]


def test_coco_script_defaults_are_one_override_away():
    """SPEC §3.0: w_cle / w_une are 0.1 / 0.01 in the script's defaults, 0.05 / 0.0 in the log."""
    cfg = load_config(COCO_YAML, ["loss.w_cle=0.1", "loss.w_une=0.01"])
    assert (cfg.loss.w_cle, cfg.loss.w_une) == (0.1, 0.01)
    assert "loss.w_cle=0.1 loss.w_une=0.01" in COCO_YAML.read_text()


# -- staged losses --------------------------------------------------------------------------------

BASE = {"cls": 1.0, "aux": 1.0, "tok": 1.0}
# SPEC §3.0, written out: "iterations <= 8 000: L_cls + L_aux + L_tok only; <= 12 000: + w_ptc L_ptc;
# <= 16 000: + w_cle L_cle + w_une L_une; after: + w_seg L_seg + w_reg L_reg" (weights of the log)
COCO_PTC = {**BASE, "ptc": 0.3}
COCO_LIR = {**COCO_PTC, "cle": 0.05, "une": 0.0}
COCO_ALL = {**COCO_LIR, "seg": 0.12, "reg": 0.05}
COCO_EXPECTED = {0: BASE, 1: BASE, 7999: BASE, 8000: BASE, 8001: COCO_PTC, 11999: COCO_PTC, 12000: COCO_PTC,
                 12001: COCO_LIR, 15999: COCO_LIR, 16000: COCO_LIR, 16001: COCO_ALL, 50000: COCO_ALL,
                 79999: COCO_ALL}
# SPEC §3.6 for VOC: "iterations <= 2 000 (warm): L_cls + L_aux + L_tok + w_cle L_cle + w_une L_une +
# w_ptc L_ptc; after: add w_seg L_seg + w_reg L_reg"
VOC_WARM = {**BASE, "ptc": 0.3, "cle": 0.2, "une": 0.1}
VOC_ALL = {**VOC_WARM, "seg": 0.12, "reg": 0.05}
VOC_EXPECTED = {0: VOC_WARM, 1999: VOC_WARM, 2000: VOC_WARM, 2001: VOC_ALL, 10000: VOC_ALL, 19999: VOC_ALL}


@pytest.mark.parametrize("path,expected", [(COCO_YAML, COCO_EXPECTED), (VOC_YAML, VOC_EXPECTED)],
                         ids=["coco", "voc"])
def test_active_weights_at_the_stage_boundaries(path, expected):
    cfg = load_config(path)
    schedule = Schedule.from_config(cfg)
    got = {it: active_weights(cfg.loss, schedule, it) for it in expected}
    assert got == expected


def test_stages_scale_with_max_iters():
    """The starts are fractions: a 10x shorter COCO run keeps the recipe's proportions."""
    cfg = load_config(COCO_YAML, ["train.max_iters=8000"])
    s = Schedule.from_config(cfg)
    assert s.loss_starts == {"ptc": 801, "cle": 1201, "une": 1201, "seg": 1601, "reg": 1601}
    assert s.cam2mask == 5000 and s.all_losses_from == 1601


@pytest.mark.parametrize("override,message", [
    ("loss.starts.seq=0.2", "unknown key 'loss.starts.seq'; valid keys of loss.starts: ptc, cle, une, seg, reg"),
    ("loss.starts.ptc=-0.1", "loss.starts.ptc: a fraction of train.max_iters >= 0"),
    ("loss.starts.ptc=early", "loss.starts.ptc: expected a float"),
    ("train.seg_start=0.1", "unknown key 'train.seg_start'"),  # replaced by loss.starts.seg / .reg
    ("loss.temp=0.5", "unknown key 'loss.temp'"),  # CLE's is loss.cle_temp; UNE has none
    ("loss.aux_high=0.7", "unknown key 'loss.aux_high'"),  # the aux labels use cam.high_thre / low_thre
])
def test_stage_config_errors_name_the_valid_keys(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(COCO_YAML, [override])


# -- the coco augmentation ------------------------------------------------------------------------

class ScriptedRng:
    """Stands in for np.random.Generator with scripted draws, one queue per method."""

    def __init__(self, random=(), uniform=(), integers=(), permutation=()):
        self.queues = {"random": list(random), "uniform": list(uniform), "integers": list(integers),
                       "permutation": list(permutation)}

    def _pop(self, name):
        assert self.queues[name], f"unexpected extra rng.{name}() call"
        return self.queues[name].pop(0)

    def random(self):
        return self._pop("random")

    def uniform(self, low, high):
        value = self._pop("uniform")
        assert low <= value <= high
        return value

    def integers(self, low, high):
        value = self._pop("integers")
        assert low <= value < high, (low, value, high)
        return value

    def permutation(self, n):
        return np.asarray(self._pop("permutation"))

    def drained(self):
        return not any(self.queues.values())


def _black():
    """Normalised value of a black (uint8 0) pixel: (0 − mean) / std."""
    return torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1)


def _halves_image():
    """40×60 image: left half red (200, 30, 30), right half blue (30, 30, 200); label 1 | 2."""
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30] = (200, 30, 30)
    img[:, 30:] = (30, 30, 200)
    lab = np.ones((40, 60), np.uint8)
    lab[:, 30:] = 2
    return img, lab


def test_coco_aug_geometry_padding_and_valid():
    """No jitter (draw 0.8 is not < 0.8), factor 0.5 -> 20×30, flipped, pasted at (5, 7) of a 48×48
    black canvas, crop at (0, 0): the image region holds blue | red, the rest black; valid all True."""
    img, lab = _halves_image()
    rng = ScriptedRng(random=[0.8, 0.1], uniform=[0.5], integers=[5, 7, 0, 0])
    x, valid, out_lab = TrainTransform(48, mode="coco")(img, rng, lab)
    assert rng.drained()
    assert x.shape == (3, 48, 48) and valid.shape == (48, 48) and valid.all()
    black, red, blue = _black(), _normalised((200, 30, 30)), _normalised((30, 30, 200))
    inside = torch.zeros(48, 48, dtype=torch.bool)
    inside[5:25, 7:37] = True
    torch.testing.assert_close(x[:, ~inside], black.expand(3, int((~inside).sum())), atol=1e-6, rtol=0)
    # flipped: blue on the left; the two columns at the seam may mix under bilinear resampling
    torch.testing.assert_close(x[:, 5:25, 7:21].reshape(3, -1), blue.expand(3, 20 * 14), atol=1e-6, rtol=0)
    torch.testing.assert_close(x[:, 5:25, 23:37].reshape(3, -1), red.expand(3, 20 * 14), atol=1e-6, rtol=0)
    # the label follows the geometry (nearest); the padding is ignore although it is valid
    assert (out_lab[~inside] == 255).all()
    assert (out_lab[5:25, 7:22] == 2).all() and (out_lab[5:25, 22:37] == 1).all()


def _normalised(rgb):
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1)


def test_coco_aug_crops_a_large_image_and_jitters_with_p_08():
    """Factor 1.0 on a 40×60 image with crop 32: no padding; the crop window (3, 20) of the unflipped
    image. Draw 0.79 < 0.8 applies the jitter (brightness x1.2 first), 0.8 does not."""
    img, lab = _halves_image()
    no_jitter = ScriptedRng(random=[0.8, 0.9], uniform=[1.0], integers=[0, 0, 3, 20])
    x, valid, out_lab = TrainTransform(32, mode="coco")(img, no_jitter, lab)
    assert no_jitter.drained() and valid.all()
    assert torch.equal(out_lab, torch.from_numpy(lab[3:35, 20:52].astype(np.int64)))
    torch.testing.assert_close(x[:, :, :10].reshape(3, -1), _normalised((200, 30, 30)).expand(3, 320), atol=1e-6,
                               rtol=0)
    # jitter: brightness 1.2, contrast/saturation 1.0, hue 0, brightness applied first
    jitter = ScriptedRng(random=[0.79, 0.9], uniform=[1.2, 1.0, 1.0, 0.0, 1.0], integers=[0, 0, 3, 20],
                         permutation=[[0, 1, 2, 3]])
    xj, _, _ = TrainTransform(32, mode="coco")(img, jitter, lab)
    assert jitter.drained()
    # adjust_hue(0) still round-trips through PIL's 8-bit HSV: one grey level (1/255/std < 0.02)
    torch.testing.assert_close(xj[:, :, :10].reshape(3, -1), _normalised((240, 36, 36)).expand(3, 320), atol=0.02,
                               rtol=0)


def test_coco_aug_with_a_real_rng_is_deterministic_and_rescales_both_sides_alike():
    """A constant grey 300×500 image (never black under the jitter) at crop 448: the non-black box
    is the rescaled image, its height 300·r with r in [0.32, 1], the aspect kept."""
    img = np.full((300, 500, 3), 128, np.uint8)
    t = TrainTransform(448, mode="coco")
    black = _black().view(3, 1, 1)
    for seed in range(6):
        x, valid, _ = t(img, np.random.default_rng(seed))
        x2, _, _ = t(img, np.random.default_rng(seed))
        assert torch.equal(x, x2) and valid.all()
        content = ~torch.isclose(x, black, atol=1e-5).all(dim=0)
        rows, cols = content.any(1).nonzero().flatten(), content.any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert content.sum() == h * w  # one rectangle
        assert 0.32 * 300 - 1 <= h <= 300  # the whole height fits in 448
        if w < 448:  # not cut by the crop: one factor for both sides
            assert abs(w / 500 - h / 300) < 2 / 300, (seed, h, w)


# -- a shrunk COCO run through every stage, two gloo processes -----------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, path, overrides):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from wsss.train.loop import train

    train(load_config(path, overrides))


def test_shrunk_coco_recipe_trains_under_ddp_through_every_stage(tmp_path_factory, tmp_path):
    """configs/coco.yaml with only sizes shrunk (and the script's w_cle/w_une, so that UNE runs):
    13 iterations put the shipped fractions at ptc from iteration 2 (round(1.3) = 1, then <=),
    CLE/UNE from 3 (round(1.95) = 2), seg/reg from 4 (round(2.6) = 3), cam2mask 8, validation
    from round(9.75) = 10. Two processes: a parameter without a gradient in any stage stops DDP."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("syn_coco"), seed=5, num_train=8, num_val=2, size=64,
                                  num_classes=3)
    overrides = TINY + [f"data.root={root}", f"run_dir={tmp_path}", "data.dataset=voc", "data.val_split=val",
                        "model.pretrained=", "model.decoder_dim=16", "train.max_iters=13", "train.batch_size=2",
                        "train.eval_interval=5", "train.ckpt_interval=13", "eval.crf=false",
                        "loss.w_cle=0.1", "loss.w_une=0.01"]
    cfg = load_config(COCO_YAML, overrides)
    s = Schedule.from_config(cfg)
    assert s.loss_starts == {"ptc": 2, "cle": 3, "une": 3, "seg": 4, "reg": 4} and s.cam2mask == 8
    assert cfg.data.aug == "coco" and cfg.cam.high_thre == 0.65 and cfg.loss.cle_temp == 0.1
    mp.spawn(_worker, args=(2, _free_port(), str(COCO_YAML), overrides), nprocs=2, join=True)

    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {}
    for r in rows:
        logged.setdefault(int(r["step"]), {})[r["name"]] = float(r["value"])
    # the row at logged step k holds iteration k - 1's losses
    base = {"loss/cls", "loss/aux", "loss/tok", "loss/seg", "loss/total", "lr"}  # loss/seg: the idle zero
    for step in range(1, 14):
        it = step - 1
        expected = set(base)
        expected |= {"loss/ptc"} if it >= 2 else set()
        expected |= {"loss/cle", "loss/une"} if it >= 3 else set()
        expected |= {"loss/reg"} if it >= 4 else set()
        names = {k for k in logged[step] if not k.startswith("val/")}
        assert names == expected, (step, sorted(names))
        assert (logged[step]["loss/seg"] == 0.0) == (it < 4), (step, logged[step]["loss/seg"])
    val_steps = sorted({int(r["step"]) for r in rows if r["name"].startswith("val/")})
    assert val_steps == [10, 13]  # every 5 from round(0.75 x 13) = 10 on, and the final one
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 13
