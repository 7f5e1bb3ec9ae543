"""Every checkpoint format users bring (``wsss.models.checkpoints``): wsss's own, the official MoRe
(SPEC §2) and AReAM / MCTformer-V2 (SPEC §5) layouts, ImageNet ViT files for ``model.pretrained``.

The official state dicts are built from the LITERAL key lists below with random tensors of the
right shapes, not from the code's own inverse converters, and the converted models are checked
against a plain functional forward written from those official tensors."""
import argparse
import dataclasses
import decimal
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wsss.config import config_to_dict, load_config, save_config
from wsss.models import AReAM, MoRe, load_pretrained_vit
from wsss.models.checkpoints import checkpoint_format, load_trained_model, read_state_dict
from wsss.utils.checkpoint import load_checkpoint, read_torch_file

# Official MoRe state dict of a depth-2 encoder (SPEC §2 "Official checkpoint layout").
MORE_KEYS = [
    "encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias",
    "encoder.blocks.0.norm1.weight", "encoder.blocks.0.norm1.bias",
    "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.attn.qkv.bias",
    "encoder.blocks.0.attn.proj.weight", "encoder.blocks.0.attn.proj.bias",
    "encoder.blocks.0.norm2.weight", "encoder.blocks.0.norm2.bias",
    "encoder.blocks.0.mlp.fc1.weight", "encoder.blocks.0.mlp.fc1.bias",
    "encoder.blocks.0.mlp.fc2.weight", "encoder.blocks.0.mlp.fc2.bias",
    "encoder.blocks.1.norm1.weight", "encoder.blocks.1.norm1.bias",
    "encoder.blocks.1.attn.qkv.weight", "encoder.blocks.1.attn.qkv.bias",
    "encoder.blocks.1.attn.proj.weight", "encoder.blocks.1.attn.proj.bias",
    "encoder.blocks.1.norm2.weight", "encoder.blocks.1.norm2.bias",
    "encoder.blocks.1.mlp.fc1.weight", "encoder.blocks.1.mlp.fc1.bias",
    "encoder.blocks.1.mlp.fc2.weight", "encoder.blocks.1.mlp.fc2.bias",
    "encoder.norm.weight", "encoder.norm.bias", "encoder.head.weight", "encoder.head.bias",
    "decoder.conv6.weight", "decoder.conv7.weight", "decoder.conv8.weight",
    "classifier.weight", "aux_classifier.weight",
    "graph_layer._fc1.0.weight", "graph_layer._fc1.0.bias",
    "graph_layer.head_proj.weight", "graph_layer.head_proj.bias",
    "graph_layer.tail_proj.weight", "graph_layer.tail_proj.bias",
    "graph_layer.linear1.weight", "graph_layer.linear1.bias",
    "graph_layer.linear2.weight", "graph_layer.linear2.bias",
    "graph_layer.norm.weight", "graph_layer.norm.bias",
]
# Official AReAM / MCTformer-V2 (deit_small_MCTformerV2_patch16_224) ``model`` entry, depth 2.
# "split": pos_embed_cls / pos_embed_pat beside timm's unused pos_embed (1,1+N,D);
# "joint" (AReAM's networks/mctformer.py): one pos_embed (1,C+N,D).
_MCT_BLOCKS = [
    "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
    "blocks.1.norm1.weight", "blocks.1.norm1.bias", "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias",
    "blocks.1.attn.proj.weight", "blocks.1.attn.proj.bias", "blocks.1.norm2.weight", "blocks.1.norm2.bias",
    "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc1.bias", "blocks.1.mlp.fc2.weight", "blocks.1.mlp.fc2.bias",
]
AREAM_KEYS = {
    "split": ["cls_token", "pos_embed_cls", "pos_embed_pat", "pos_embed", "patch_embed.proj.weight",
              "patch_embed.proj.bias", *_MCT_BLOCKS, "norm.weight", "norm.bias", "head.weight", "head.bias"],
    "joint": ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", *_MCT_BLOCKS,
              "norm.weight", "norm.bias", "head.weight", "head.bias"],
}

C, R, D, HEADS, P, DEC = 3, 2, 32, 2, 8, 16  # classes, MoRe reg tokens, width, heads, patch, decoder width


def _shape(name: str, layout: str, grid: int, classes: int = C):
    """The shape of an official entry (tiny dims); ``layout`` is "more", "split" or "joint"."""
    N, T0 = grid * grid, (R + classes if layout == "more" else classes)
    name = name[len("encoder."):] if name.startswith("encoder.") else name
    table = {
        "cls_token": (1, T0, D), "pos_embed_cls": (1, classes, D), "pos_embed_pat": (1, N, D),
        "pos_embed": (1, (1 if layout == "split" else T0) + N, D),
        "patch_embed.proj.weight": (D, 3, P, P), "head.bias": (T0,) if layout == "more" else (classes,),
        "head.weight": (T0, D) if layout == "more" else (classes, D, 3, 3),
        "decoder.conv6.weight": (DEC, D, 3, 3), "decoder.conv7.weight": (DEC, DEC, 3, 3),
        "decoder.conv8.weight": (classes + 1, DEC, 1, 1), "classifier.weight": (classes, D, 1, 1),
        "aux_classifier.weight": (classes, D, 1, 1),
    }
    if name in table:
        return table[name]
    if name.endswith("qkv.weight"):
        return (3 * D, D)
    if name.endswith("qkv.bias"):
        return (3 * D,)
    if name.endswith("fc1.weight"):
        return (4 * D, D)
    if name.endswith("fc1.bias"):
        return (4 * D,)
    if name.endswith("fc2.weight"):
        return (D, 4 * D)
    return (D, D) if name.endswith(".weight") and "norm" not in name else (D,)


def random_official(keys, layout: str, grid: int = 4, seed: int = 0, classes: int = C) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k in keys:
        shape = _shape(k, layout, grid, classes)
        v = 0.1 * torch.randn(shape, generator=g)
        sd[k] = 1.0 + v if "norm" in k and k.endswith(".weight") else v
    return sd


def _reference_encoder(sd, prefix, x, token_pos, patch_pos, heads=HEADS):
    """The official pre-norm ViT forward written from its tensors: tokens (B,T,D) after the
    last block (no final norm). Patch positions resized as the official code (+0.1 scale)."""
    B, _, H, W = x.shape
    h, w, g = H // P, W // P, math.isqrt(patch_pos.shape[1])
    patches = F.conv2d(x, sd[prefix + "patch_embed.proj.weight"], sd[prefix + "patch_embed.proj.bias"], stride=P)
    patches = patches.flatten(2).transpose(1, 2)
    if (h, w) != (g, g):
        grid = patch_pos.reshape(1, g, g, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic", align_corners=False)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, D)
    t = torch.cat([sd[prefix + "cls_token"].expand(B, -1, -1) + token_pos, patches + patch_pos], dim=1)
    T, dh = t.shape[1], D // heads
    depth = 1 + max(int(k[len(prefix):].split(".")[1]) for k in sd if k.startswith(prefix + "blocks."))
    for i in range(depth):
        p = lambda n: sd[f"{prefix}blocks.{i}.{n}"]  # noqa: E731
        y = F.layer_norm(t, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias"))
        q, k, v = qkv.reshape(B, T, 3, heads, dh).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * dh ** -0.5).softmax(dim=-1)
        t = t + F.linear((a @ v).transpose(1, 2).reshape(B, T, D), p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.layer_norm(t, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        t = t + F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                         p("mlp.fc2.bias"))
    return t, (h, w)


def _reference_mctformer(sd, x, layout):
    """MCTformer-V2's forward from its tensors: (class logits, patch logits, CAM)."""
    if layout == "split":
        token_pos, patch_pos = sd["pos_embed_cls"], sd["pos_embed_pat"]
    else:
        token_pos, patch_pos = sd["pos_embed"][:, :C], sd["pos_embed"][:, C:]
    t, (h, w) = _reference_encoder(sd, "", x, token_pos, patch_pos)
    fmap = t[:, C:].transpose(1, 2).reshape(x.shape[0], D, h, w)
    cam = F.conv2d(fmap, sd["head.weight"], sd["head.bias"], padding=1)
    return t[:, :C].mean(-1), cam.mean(dim=(2, 3)), cam


def _reference_more(sd, x):
    """MoRe's encoder + heads from the official tensors (GCR is checked against the module)."""
    T0 = R + C
    pos = sd["encoder.pos_embed"]
    t, (h, w) = _reference_encoder(sd, "encoder.", x, pos[:, :T0], pos[:, T0:])
    t = F.layer_norm(t, (D,), sd["encoder.norm.weight"], sd["encoder.norm.bias"], eps=1e-6)
    fmap = t[:, T0:].transpose(1, 2).reshape(x.shape[0], D, h, w)
    seg = F.relu(F.conv2d(fmap, sd["decoder.conv6.weight"], padding=5, dilation=5))
    seg = F.relu(F.conv2d(seg, sd["decoder.conv7.weight"], padding=5, dilation=5))
    seg = F.conv2d(seg, sd["decoder.conv8.weight"])
    cls = F.conv2d(F.adaptive_max_pool2d(fmap, 1), sd["classifier.weight"]).flatten(1)
    return {"patch_features": fmap, "seg_logits": seg, "cls_logits": cls}


def _more_cfg(*extra):
    return load_config(None, ["model.method=more", f"model.num_heads={HEADS}", "model.aux_layer=-2", *extra]).model


def _aream_cfg(*extra):
    return load_config(None, ["model.method=aream", f"model.num_heads={HEADS}", *extra]).model


def _save(obj, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


def _mctformer_file_entries(model_sd):
    """What MCTformer/AReAM's main.py saves: the state dict beside non-tensor objects."""
    args = argparse.Namespace(model="deit_small_MCTformerV2_patch16_224", lr=5e-4 * 64 / 512, epochs=60,
                              data_set="VOC12", output_dir="out", resume="", finetune=None)
    return {"model": model_sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0]}]},
            "lr_scheduler": {"base_values": [6.25e-5], "t_initial": 60}, "epoch": 59, "args": args}


# --- official MoRe ------------------------------------------------------------------------------

MORE_WRAPS = {
    "voc_flat_ddp": lambda sd: {"module." + k: v for k, v in sd.items()},  # official VOC file
    "coco_model_state_dict": lambda sd: {"model_state_dict": {"module." + k: v for k, v in sd.items()},
                                         "optimizer_state_dict": {"state": {}}, "iter": 80000},
    "model_entry": lambda sd: {"model": sd},
}


@pytest.mark.parametrize("wrap,suffix", [("voc_flat_ddp", ".pth"), ("coco_model_state_dict", ".pth"),
                                         ("model_entry", ".pt"), ("voc_flat_ddp", ".safetensors")])
def test_official_more_loads_and_matches_its_tensors(tmp_path, wrap, suffix):
    sd = random_official(MORE_KEYS, "more")
    path = _save(MORE_WRAPS[wrap](sd), tmp_path / f"more{suffix}")
    assert checkpoint_format(read_torch_file(path) if suffix != ".safetensors" else sd) == "more_official"
    model, num_classes, fmt = load_trained_model(path, _more_cfg())
    assert (fmt, num_classes, model.training) == ("more_official", C, False)
    # the same tensors in a model built by hand (official names -> wsss names, unused ones dropped)
    by_hand = MoRe(C, backbone="custom", num_reg_tokens=R, aux_layer=-2, embed_dim=D, depth=2, num_heads=HEADS,
                   patch_size=P, img_size=4 * P, decoder_dim=DEC).eval()
    by_hand.load_state_dict({("backbone." + k[8:] if k.startswith("encoder.") else k): v for k, v in sd.items()
                             if not k.startswith(("encoder.head.", "graph_layer._fc1."))})
    x = torch.randn(2, 3, 40, 24)  # 5x3 grid: positions resized from the 4x4 pretraining grid
    with torch.no_grad():
        got, want, ref = model(x), by_hand(x), _reference_more(sd, x)
        for name in got.__dataclass_fields__:
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0, msg=name)
        for name, value in ref.items():  # float32 with a fused-attention path: ~1e-6
            torch.testing.assert_close(getattr(got, name), value, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(model.lam(x), by_hand.lam(x), rtol=0, atol=0)


def test_more_inverse_writes_the_official_names():
    m = MoRe(C, backbone="custom", num_reg_tokens=R, embed_dim=D, depth=2, num_heads=HEADS, patch_size=P,
             img_size=4 * P, decoder_dim=DEC, aux_layer=-1)
    official = m.official_state_dict()
    assert sorted(official) == sorted(MORE_KEYS)
    assert all(tuple(v.shape) == _shape(k, "more", 4) for k, v in official.items())


# --- official AReAM / MCTformer-V2 --------------------------------------------------------------

@pytest.mark.parametrize("layout,container,suffix", [
    ("split", "mctformer", ".pth"),  # {"model", "optimizer", "lr_scheduler", "epoch", "args": Namespace}
    ("joint", "mctformer", ".pth"),
    ("split", "flat_ddp", ".safetensors"),
    ("joint", "flat", ".pth"),
])
def test_official_aream_loads_and_matches_the_official_forward(tmp_path, layout, container, suffix):
    sd = random_official(AREAM_KEYS[layout], layout)
    obj = {"mctformer": lambda: _mctformer_file_entries(sd), "flat": lambda: sd,
           "flat_ddp": lambda: {"module." + k: v for k, v in sd.items()}}[container]()
    path = _save(obj, tmp_path / f"mct{suffix}")
    model, num_classes, fmt = load_trained_model(path, _aream_cfg())
    assert (fmt, num_classes, model.depth, model.patch_size) == ("aream_official", C, 2, P)
    for x in (torch.randn(2, 3, 32, 32), torch.randn(1, 3, 40, 24)):  # the pretraining grid, and another
        with torch.no_grad():
            out = model(x)
        cls_logits, patch_logits, cam = _reference_mctformer(sd, x, layout)
        torch.testing.assert_close(out.cls_logits, cls_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.patch_logits, patch_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.cam, cam, rtol=1e-4, atol=1e-5)
    # the inverse writes the literal official names back, and round-trips exactly
    back = model.official_state_dict(layout)
    assert sorted(back) == sorted(AREAM_KEYS[layout])
    unused = {"norm.weight", "norm.bias"} | ({"pos_embed"} if layout == "split" else set())  # written as defaults
    for k in set(back) - unused:
        assert torch.equal(back[k], sd[k]), k
    again = AReAM.from_official_state_dict(back, num_heads=HEADS).eval()
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        assert torch.equal(again(x).cam, model(x).cam)


def test_namespace_args_load_but_other_objects_are_refused(tmp_path):
    sd = random_official(AREAM_KEYS["joint"], "joint")
    ok = _save(_mctformer_file_entries(sd), tmp_path / "ok.pth")
    assert isinstance(read_torch_file(ok)["args"], argparse.Namespace)
    odd = _save({**_mctformer_file_entries(sd), "extra": decimal.Decimal("1.5")}, tmp_path / "odd.pth")
    with pytest.raises(ValueError,
                       match=r"(?s)odd\.pth.*weights_only=True.*decimal\.Decimal.*torch\.save\(c\['model'\]"):
        load_trained_model(odd, _aream_cfg())


# --- wsss's own checkpoints, resume ------------------------------------------------------------

def _wsss_checkpoint(tmp_path, method="more"):
    """A checkpoint as ``wsss.train`` writes it; its config names an ImageNet file that is not there."""
    from wsss.models import build_model

    cfg = load_config(None, [f"model.method={method}", "model.backbone=custom", f"model.embed_dim={D}",
                             "model.depth=2", f"model.num_heads={HEADS}", f"model.patch_size={P}",
                             "model.img_size=32", "model.aux_layer=-1", f"model.decoder_dim={DEC}",
                             "model.num_reg_tokens=2", "model.pretrained=/nowhere/imagenet.pth"])
    model = build_model(dataclasses.replace(cfg.model, pretrained=""), C).eval()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
                "scaler": {}, "step": 4, "config": config_to_dict(cfg), "num_classes": C, "rng": []}, path)
    return cfg, model, path


@pytest.mark.parametrize("method", ["more", "aream"])
def test_wsss_checkpoint_loads_and_resumes(tmp_path, method):
    cfg, model, path = _wsss_checkpoint(tmp_path, method)
    sd, meta = read_state_dict(path)
    assert (meta["format"], meta["wrapper"], meta["checkpoint"]["step"]) == ("wsss", "model", 4)
    # model.pretrained names a file that is not there: a trained checkpoint never reads it
    loaded, num_classes, fmt = load_trained_model(path, cfg.model)
    assert (fmt, num_classes) == ("wsss", C)
    x = torch.randn(1, 3, 32, 24)
    with torch.no_grad():
        a, b = loaded(x), model(x)
    for name in a.__dataclass_fields__:
        if isinstance(getattr(a, name), torch.Tensor):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert load_checkpoint(path)["step"] == 4


def test_resume_and_pretrained_refuse_other_formats(tmp_path):
    more = _save({"module." + k: v for k, v in random_official(MORE_KEYS, "more").items()}, tmp_path / "m.pth")
    with pytest.raises(ValueError, match=r"m\.pth is an official MoRe checkpoint.*wsss\.eval --ckpt"):
        load_checkpoint(more)
    mct = _save(_mctformer_file_entries(random_official(AREAM_KEYS["split"], "split")), tmp_path / "mct.pth")
    with pytest.raises(ValueError, match=r"mct\.pth is an official AReAM / MCTformer-V2 checkpoint, not an ImageNet"):
        AReAM(C, backbone="custom", embed_dim=D, depth=2, num_heads=HEADS, patch_size=P, img_size=32,
              pretrained=str(mct))
    vit = _save(_timm_vit().state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"vit\.pth is an ImageNet ViT checkpoint.*belongs in model\.pretrained"):
        load_trained_model(vit, _more_cfg())
    with pytest.raises(ValueError, match=r"vit\.pth is an ImageNet ViT checkpoint.*model\.pretrained="):
        load_checkpoint(vit)


# --- errors that name the file, the format and the keys ----------------------------------------

def _drop(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _put(key, shape):  # adds the entry, or replaces it with one of another shape
    return lambda sd: {**sd, key: torch.zeros(shape)}


ERRORS = [  # (official layout, edit, method, expected in the message)
    ("more", _drop("encoder.blocks.1.mlp.fc2.bias"), "more", r"missing \['encoder\.blocks\.1\.mlp\.fc2\.bias'\]"),
    ("more", _drop("encoder.cls_token"), "more", r"missing 'encoder\.cls_token'"),
    ("more", _put("encoder.blocks.0.attn.extra.weight", (D, D)), "more",
     r"unexpected \['encoder\.blocks\.0\.attn\.extra\.weight'\]"),
    ("more", _put("decoder.conv8.weight", (C + 3, DEC, 1, 1)), "more", r"decoder\.conv8\.weight"),
    ("split", _drop("blocks.1.attn.proj.weight"), "aream", r"missing \['blocks\.1\.attn\.proj\.weight'\]"),
    ("split", _drop("pos_embed_pat"), "aream", r"missing \['pos_embed_pat'\]"),
    ("joint", _put("dist_token", (1, 1, D)), "aream", r"unexpected \['dist_token'\]"),
    ("split", _put("head.weight", (C + 1, D, 3, 3)), "aream", r"class count: head\.weight.*cls_token"),
    ("joint", _put("head.bias", (C + 1,)), "aream", r"head\.bias"),
]


@pytest.mark.parametrize("layout,edit,method,expected", ERRORS)
def test_mismatches_name_file_format_and_key(tmp_path, layout, edit, method, expected):
    keys = MORE_KEYS if layout == "more" else AREAM_KEYS[layout]
    path = _save({"model": edit(random_official(keys, layout))}, tmp_path / f"bad_{layout}.pth")
    fmt = "an official MoRe checkpoint" if layout == "more" else "an official AReAM / MCTformer-V2 checkpoint"
    with pytest.raises(ValueError, match=rf"(?s)bad_{layout}\.pth: read as {fmt}, but it does not fit: .*{expected}"):
        load_trained_model(path, _more_cfg() if method == "more" else _aream_cfg())


def test_wsss_mismatch_names_the_key_and_the_config_difference(tmp_path):
    cfg, _, path = _wsss_checkpoint(tmp_path, "more")
    with pytest.raises(ValueError, match=r"(?s)checkpoint\.pt: read as a wsss checkpoint.*missing "
                                         r"\['backbone\.blocks\.2\..*model\.depth=2 \(the config: 3\)"):
        load_trained_model(path, dataclasses.replace(cfg.model, depth=3))
    with pytest.raises(ValueError, match=r"checkpoint\.pt: a wsss checkpoint with 3 classes, expected num_classes=5"):
        load_trained_model(path, cfg.model, num_classes=5)


def test_method_mismatch_names_both(tmp_path):
    mct = _save(_mctformer_file_entries(random_official(AREAM_KEYS["joint"], "joint")), tmp_path / "mct.pth")
    with pytest.raises(ValueError, match=r"mct\.pth is an official AReAM.*model\.method=aream.*model\.method='more'"):
        load_trained_model(mct, _more_cfg())
    more = _save(random_official(MORE_KEYS, "more"), tmp_path / "more.pth")
    with pytest.raises(ValueError, match=r"more\.pth is an official MoRe.*model\.method=more/baseline.*'aream'"):
        load_trained_model(more, _aream_cfg())
    _, _, path = _wsss_checkpoint(tmp_path, "aream")
    with pytest.raises(ValueError, match=r"wsss checkpoint of a model\.method=aream network.*'baseline'"):
        load_trained_model(path, _more_cfg("model.method=baseline"))


def test_unrecognised_file_lists_its_keys(tmp_path):
    path = _save({"weights": {"layer.w": torch.zeros(2)}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd\.pth: holds a dict whose entries \['weights'\]"):
        load_trained_model(path, _more_cfg())
    path = _save({"layer.w": torch.zeros(2)}, tmp_path / "odd2.pth")
    with pytest.raises(ValueError, match=r"odd2\.pth: no known checkpoint layout fits its keys \['layer\.w'\]"):
        load_trained_model(path, _more_cfg())


# --- ImageNet ViT files for model.pretrained ---------------------------------------------------

def _timm_vit(name="vit_tiny_patch16_224", img_size=32, **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, embed_dim=D, depth=2, num_heads=HEADS, img_size=img_size,
                             patch_size=P, num_classes=7, **kw)


def _imagenet_file(tmp_path, layout):
    if layout == "deit_distilled":
        vit = _timm_vit("deit_tiny_distilled_patch16_224")
    elif layout == "timm_avg_fc_norm":
        vit = _timm_vit(global_pool="avg")
    else:
        vit = _timm_vit(img_size=48 if layout == "jx_flat" else 32)  # jx files: timm names, another grid
    sd = vit.state_dict()
    obj = {"model": sd, "optimizer": {}, "epoch": 299} if layout.startswith("deit") else sd
    suffix = ".safetensors" if layout == "timm_safetensors" else ".pth"
    return vit, sd, _save(obj, tmp_path / f"{layout}{suffix}")


@pytest.mark.parametrize("layout", ["timm_flat", "timm_safetensors", "deit_model", "deit_distilled", "jx_flat",
                                    "timm_avg_fc_norm"])
def test_imagenet_vit_files_load_as_pretrained(tmp_path, layout):
    vit, sd, path = _imagenet_file(tmp_path, layout)
    assert read_state_dict(path)[1]["format"] == "vit_imagenet"
    if layout == "deit_distilled":
        assert {"dist_token", "head_dist.weight"} <= set(sd)
    if layout == "timm_avg_fc_norm":
        assert "fc_norm.weight" in sd and "norm.weight" not in sd
    more = MoRe(C, backbone="custom", num_reg_tokens=R, embed_dim=D, depth=2, num_heads=HEADS, patch_size=P,
                img_size=32, decoder_dim=DEC, aux_layer=-1, pretrained=str(path))
    aream = AReAM(C, backbone="custom", embed_dim=D, depth=2, num_heads=HEADS, patch_size=P, img_size=32,
                  pretrained=str(path))
    norm = "fc_norm" if layout == "timm_avg_fc_norm" else "norm"
    for model in (more, aream):
        bb = model.backbone
        assert torch.equal(bb.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
        assert torch.equal(bb.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
        assert torch.equal(bb.cls_token, sd["cls_token"].expand(1, bb.num_tokens, D))
        assert bb.pos_embed.shape == (1, bb.num_tokens + 16, D)
    assert torch.equal(more.backbone.norm.weight, sd[f"{norm}.weight"])
    # class-token positions come from the checkpoint's class position, the patch grid is kept/resampled
    assert torch.equal(aream.backbone.pos_embed[0, :C], sd["pos_embed"][0, :1].expand(C, D))
    if layout != "jx_flat":
        first_patch = 2 if layout == "deit_distilled" else 1
        assert torch.equal(aream.backbone.pos_embed[0, C:], sd["pos_embed"][0, first_patch:])


# --- the command line, end to end --------------------------------------------------------------

def test_eval_cli_reads_an_official_aream_checkpoint(tmp_path):
    """``python -m wsss.eval --ckpt`` on an official MCTformer-V2 file (with its pickled args),
    tiny synthetic data, in a subprocess as a user runs it."""
    from wsss.data.synthetic import make_synthetic_dataset

    from test_train import TINY

    root = make_synthetic_dataset(tmp_path / "data", seed=0, num_train=3, num_val=2, size=64, num_classes=C)
    ckpt = _save(_mctformer_file_entries(random_official(AREAM_KEYS["joint"], "joint", grid=8)),
                 tmp_path / "MCTformerV2.pth")
    cfg = load_config(None, TINY + [f"data.root={root}", f"run_dir={tmp_path / 'run'}", "model.method=aream",
                                    f"model.num_heads={HEADS}", "aream.entropy=none", "aream.layer_index=1",
                                    "eval.layerwise=false", "eval.panels=0"])
    save_config(cfg, tmp_path / "cfg.yaml")
    run = subprocess.run([sys.executable, "-m", "wsss.eval", "--cfg", str(tmp_path / "cfg.yaml"), "--ckpt", str(ckpt),
                          "--out", str(tmp_path / "eval")], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "AReAM CAM pseudo labels (train)" in run.stdout
    assert (tmp_path / "eval" / "results.md").is_file()
