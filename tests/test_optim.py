"""MoRe's optimizer (SPEC §3.7) from configs/voc.yaml: five AdamW groups with the stated lr
multipliers and weight decay, and the warm-up + poly schedule at chosen steps, against
expectations written here from the SPEC text."""
import pytest
import torch

from wsss.config import load_config
from wsss.methods import get_method
from wsss.train.optim import build_optimizer

SMALL = ["model.backbone=custom", "model.embed_dim=32", "model.depth=3", "model.num_heads=2", "model.patch_size=8",
         "model.img_size=32", "model.decoder_dim=8", "model.pretrained="]


def test_five_groups_lr_multipliers_and_decay():
    cfg = load_config("configs/voc.yaml", SMALL)
    model = get_method("more").build_model(cfg.model, 20)
    opt, _ = build_optimizer(model, cfg.optim, cfg.train.max_iters)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = [sorted(name_of[id(p)] for p in g["params"]) for g in opt.param_groups]

    def spec_group(name):  # SPEC §3.7: backbone non-norm, backbone norm, classifiers, GCR, decoder
        if name.startswith("backbone."):
            return 1 if "norm" in name else 0
        if name.startswith(("classifier.", "aux_classifier.")):
            return 2
        return {"graph_layer": 3, "decoder": 4}[name.split(".")[0]]

    expected = [[] for _ in range(5)]
    for n, _ in model.named_parameters():
        expected[spec_group(n)].append(n)
    assert groups == [sorted(g) for g in expected]
    lr = 6e-5
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([lr, lr, 10 * lr, 10 * lr, 10 * lr])
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


@pytest.mark.parametrize("step", [0, 1, 750, 1499, 1500, 1501, 10000, 19999])
def test_warmup_then_poly_at_chosen_steps(step):
    cfg = load_config("configs/voc.yaml", SMALL)
    model = get_method("more").build_model(cfg.model, 20)
    opt, sched = build_optimizer(model, cfg.optim, cfg.train.max_iters)
    for _ in range(step):
        opt.step()
        sched.step()
    base, warmup, max_iter = 6e-5, 1500, 20000
    if step < warmup:  # lr_g = base_g · (1 − (1 − t/warmup)·(1 − 1e-6))
        factor = 1 - (1 - step / warmup) * (1 - 1e-6)
    else:  # base_g · (1 − t/max_iter)^0.9
        factor = (1 - step / max_iter) ** 0.9
    assert opt.param_groups[0]["lr"] == pytest.approx(base * factor, rel=1e-9, abs=1e-20)
    assert opt.param_groups[4]["lr"] == pytest.approx(10 * base * factor, rel=1e-9, abs=1e-20)
