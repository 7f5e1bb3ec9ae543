import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from wsss.models import MoRe, build_backbone, load_pretrained_vit

TINY = dict(embed_dim=48, depth=3, num_heads=3, patch_size=8)


def _timm_checkpoint(tmp_path, img_size=32, wrap=False):
    torch.manual_seed(0)
    ref = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    path = tmp_path / "vit.pth"
    sd = ref.state_dict()
    torch.save({"model": sd} if wrap else sd, path)
    return ref.eval(), path


@pytest.mark.parametrize("wrap", [False, True])
def test_pretrained_single_token_matches_timm(tmp_path, wrap):
    ref, path = _timm_checkpoint(tmp_path, wrap=wrap)
    ours = build_backbone("custom", num_tokens=1, img_size=32, **TINY).eval()
    load_pretrained_vit(ours, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref.forward_features(x)
        out = ours(x)
    got = torch.cat([out.tokens, out.patches], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pretrained_multi_token_replicates_and_resizes(tmp_path):
    ref, path = _timm_checkpoint(tmp_path, img_size=32)
    torch.manual_seed(1)
    ours = build_backbone("custom", num_tokens=6, num_reg_tokens=2, img_size=48, **TINY)
    load_pretrained_vit(ours, path)
    sd = ref.state_dict()
    # every token starts from the single class token
    assert torch.equal(ours.cls_token[0], sd["cls_token"][0].expand(6, -1))
    # class tokens keep the class position embedding; regularisation tokens are re-drawn
    assert torch.equal(ours.pos_embed[0, 2:6], sd["pos_embed"][0, :1].expand(4, -1))
    assert not torch.equal(ours.pos_embed[0, :2], sd["pos_embed"][0, :1].expand(2, -1))
    assert ours.pos_embed.shape == (1, 6 + 36, 48)  # 32px grid 4x4 resampled to 48px grid 6x6
    assert torch.equal(ours.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])


def test_pretrained_errors(tmp_path):
    ours = build_backbone("custom", num_tokens=1, img_size=32, **TINY)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained_vit(ours, tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a ViT checkpoint"):
        load_pretrained_vit(ours, bad)
    wide = build_backbone("custom", num_tokens=1, img_size=32, embed_dim=96, depth=3, num_heads=3, patch_size=8)
    _, path = _timm_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="embedding width"):
        load_pretrained_vit(wide, path)


def test_attention_logits_path_equals_fused():
    torch.manual_seed(0)
    vit = build_backbone("custom", num_tokens=3, img_size=32, **TINY).eval()
    x = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        plain = vit(x)
        logged = vit(x, attn_layers=(0, -1))
    torch.testing.assert_close(plain.patches, logged.patches, rtol=1e-5, atol=1e-5)
    assert sorted(logged.attn_logits) == [0, 2]
    T = 3 + 5 * 3
    assert logged.attn_logits[2].shape == (1, 3, T, T)


def test_more_shapes_and_errors():
    torch.manual_seed(0)
    m = MoRe(5, backbone="custom", num_reg_tokens=2, img_size=32, **TINY)
    out = m(torch.randn(2, 3, 32, 48))
    assert out.cls_logits.shape == (2, 5) and out.aux_cls_logits.shape == (2, 5)
    assert out.seg_logits.shape == (2, 6, 4, 6)
    assert out.patch_features.shape == (2, 48, 4, 6)
    assert out.class_tokens.shape == (2, 5, 48)
    assert out.score_maps.shape == (2, 5, 4, 6) and not out.score_maps.requires_grad
    cam_aux, cam = m.cams(torch.randn(1, 3, 32, 32))
    assert cam.shape == cam_aux.shape == (1, 5, 4, 4)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        m(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="num_classes"):
        MoRe(0, backbone="custom", img_size=32, **TINY)
    with pytest.raises(ValueError, match="backbone 'nosuch' is unknown"):
        MoRe(3, backbone="nosuch")
