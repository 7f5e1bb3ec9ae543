"""One training step's losses (SPEC §3). ``method=baseline`` is the single-stage recipe the
foundation trains: classification + auxiliary classification, then the segmentation head
on PAR-refined CAM pseudo labels after ``seg_start``."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict

import torch
import torch.nn.functional as F

from wsss.cam import (cam_to_label, layer_entropy_bits, multi_scale_aream_cam, multi_scale_cam,
                      refine_cams_with_bkg)
from wsss.config import Config
from wsss.data.transforms import denormalize
from wsss.kernels import par_refine
from wsss.losses import (DenseEnergyLoss, classification_loss, cle_loss, seg_loss, token_regularization_loss,
                         une_loss)
from wsss.kernels import masked_cosine_affinity_loss, masked_sigmoid_affinity_loss_qk

IGNORE = 255


@dataclass
class Schedule:
    """Iteration thresholds derived from the fractions in the config."""

    seg_start: int
    cam2mask: int
    aff_start: int = 0  # AReAM: first iteration with the affinity loss

    @classmethod
    def from_config(cls, cfg: Config) -> "Schedule":
        n = cfg.train.max_iters
        return cls(seg_start=int(round(cfg.train.seg_start * n)), cam2mask=int(round(cfg.train.cam2mask * n)),
                   aff_start=int(round(cfg.aream.aff_start * n)))


def make_par(cfg: Config):
    return partial(par_refine, dilations=tuple(cfg.cam.par_dilations), num_iter=cfg.cam.par_iters, impl=cfg.impl)


def idle_decoder_term(out) -> torch.Tensor:
    """Zero that still depends on the decoder: before ``seg_start`` every parameter must take
    part in the loss so DDP's gradient all-reduce sees the same set on every step."""
    return out.seg_logits.sum() * 0.0


@torch.no_grad()
def training_cams(model, images, cfg: Config):
    """Multi-scale CAMs of the batch (SPEC §3 step 1), from the bare model also under DDP."""
    return multi_scale_cam(getattr(model, "module", model), images, tuple(cfg.cam.scales))


@torch.no_grad()
def refined_pseudo_labels(images, cam, cls_label, valid, cfg: Config):
    """Label-masked CAM → PAR with two background scores (SPEC §3 steps 2–3)."""
    valid_cam, _ = cam_to_label(cam, cls_label, bkg_thre=cfg.cam.bkg_thre, high_thre=cfg.cam.high_thre,
                                low_thre=cfg.cam.low_thre, ignore_mid=True, ignore_index=IGNORE)
    label = refine_cams_with_bkg(denormalize(images), valid_cam, cls_label, cfg.cam.high_thre, cfg.cam.low_thre,
                                 ignore_index=IGNORE, down_scale=cfg.cam.par_down_scale, par=make_par(cfg))
    label[~valid] = IGNORE
    return label


def baseline_losses(model, batch, step: int, cfg: Config, schedule: Schedule, amp_ctx) -> Dict[str, torch.Tensor]:
    images, cls_label, valid = batch["image"], batch["cls_label"], batch["valid"]
    seg_on = step >= schedule.seg_start and cfg.loss.w_seg > 0
    with amp_ctx:
        out = model(images, with_score_maps=False)
    losses = {"cls": classification_loss(out.cls_logits, cls_label),
              "aux": cfg.loss.w_aux * classification_loss(out.aux_cls_logits, cls_label)}
    if seg_on:
        cam, _ = training_cams(model, images, cfg)
        label = refined_pseudo_labels(images, cam, cls_label, valid, cfg)
        seg = F.interpolate(out.seg_logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        losses["seg"] = cfg.loss.w_seg * seg_loss(seg, label, IGNORE)
    else:
        losses["seg"] = idle_decoder_term(out)
    return losses


def _token_labels(cam, cls_label, size, high, low):
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return cam_to_label(cam, cls_label, high_thre=high, low_thre=low, ignore_mid=True, ignore_index=IGNORE)[1]


class MoReLosses:
    """MoRe's objective (SPEC §3 steps 4–6). Holds the energy loss module and the seeded
    generator UNE samples with, so a resumed run continues the same stream."""

    def __init__(self, cfg: Config, device):
        self.energy = None
        if cfg.loss.w_reg > 0:
            self.energy = DenseEnergyLoss(weight=cfg.loss.reg_weight, sigma_rgb=cfg.loss.reg_sigma_rgb,
                                          sigma_xy=cfg.loss.reg_sigma_xy, scale_factor=cfg.loss.reg_scale)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def __call__(self, model, batch, step: int, cfg: Config, schedule: Schedule, amp_ctx):
        images, y, valid = batch["image"], batch["cls_label"], batch["valid"]
        lc = cfg.loss
        seg_on = step >= schedule.seg_start
        cam, cam_aux = training_cams(model, images, cfg)
        with amp_ctx:
            out = model(images, with_score_maps=False)
        size = out.patch_features.shape[-2:]
        token_valid = F.interpolate(valid[:, None].float(), size=size, mode="nearest")[:, 0] > 0
        l_aux = _token_labels(cam_aux, y, size, lc.aux_high, lc.aux_low)
        if step < schedule.cam2mask:
            l_cle = _token_labels(cam_aux, y, size, lc.cle_high, lc.cle_low)
            l_une = l_aux
        else:
            l_cle = l_une = _token_labels(cam, y, size, lc.main_high, lc.main_low)
        for lab in (l_aux, l_cle, l_une):
            lab[~token_valid] = IGNORE
        feats = out.patch_features.float()
        losses = {
            "cls": classification_loss(out.cls_logits, y),
            "aux": lc.w_aux * classification_loss(out.aux_cls_logits, y),
            "tok": lc.w_tok * token_regularization_loss(out.class_tokens, lc.tok_temp),
            "cle": lc.w_cle * cle_loss(out.class_tokens, feats, l_cle, y, lc.temp),
            "une": lc.w_une * une_loss(out.class_tokens, feats, l_une, y, lc.temp, generator=self.generator),
            "ptc": lc.w_ptc * masked_cosine_affinity_loss(feats, l_aux, ignore_index=IGNORE, impl=cfg.impl),
        }
        if seg_on:  # the PAR-refined label feeds only the segmentation and energy losses
            label = refined_pseudo_labels(images, cam, y, valid, cfg)
            seg = F.interpolate(out.seg_logits.float(), size=images.shape[-2:], mode="bilinear",
                                align_corners=False)
            losses["seg"] = lc.w_seg * seg_loss(seg, label, IGNORE)
            if self.energy is not None:
                losses["reg"] = lc.w_reg * self.energy(images, seg, label, roi=valid.float())
        else:
            losses["seg"] = idle_decoder_term(out)
        return losses


class AReAMLosses:
    """AReAM's objective (SPEC §5, public code): two multi-label soft-margin losses, and after
    ``aff_start`` the entropy-weighted sigmoid affinity loss on layers ≥ ``layer_index``,
    computed from their queries and keys (no N×N matrix on the fast path)."""

    def __init__(self, cfg: Config, device):
        a = cfg.aream
        if a.entropy == "offline" and not a.entropy_file:
            raise ValueError("aream.entropy=offline needs aream.entropy_file (python -m wsss.tools.layer_entropy "
                             "writes it), or use aream.entropy=online|none")
        if not 0.0 <= a.entropy_momentum < 1.0:
            raise ValueError(f"aream.entropy_momentum must be in [0, 1), got {a.entropy_momentum}")
        if not 0.0 < a.score_l < a.score_h < 1.0:
            raise ValueError(f"aream needs 0 < score_l < score_h < 1, got {a.score_l} and {a.score_h}")

    def prepare(self, model, cfg: Config) -> None:
        """Checks the layer split against the model and loads the offline entropies."""
        if not 1 <= cfg.aream.layer_index < model.depth:
            raise ValueError(f"aream.layer_index={cfg.aream.layer_index} must be in [1, {model.depth - 1}] for a "
                             f"{model.depth}-block backbone")
        if cfg.aream.entropy == "offline":
            model.load_layer_entropy(cfg.aream.entropy_file)

    @torch.no_grad()
    def pseudo_labels(self, model, images, y, valid, cfg: Config) -> torch.Tensor:
        """Entropy-weighted affinity-refined CAM → PAR with the two background scores (B,H,W)."""
        a = cfg.aream
        refine_w, _ = model.layer_weights(a.entropy)
        cam = multi_scale_aream_cam(model, images, tuple(a.scales), a.layer_index, refine_w, impl=cfg.impl)
        label = refine_cams_with_bkg(denormalize(images), cam * y[:, :, None, None], y, a.score_h, a.score_l,
                                     ignore_index=IGNORE, down_scale=cfg.cam.par_down_scale, par=make_par(cfg))
        label[~valid] = IGNORE
        return label

    def __call__(self, model, batch, step: int, cfg: Config, schedule: Schedule, amp_ctx):
        images, y, valid = batch["image"], batch["cls_label"], batch["valid"]
        a = cfg.aream
        bare = getattr(model, "module", model)
        L, C = bare.depth, bare.num_classes
        aff_on = step >= schedule.aff_start and a.w_aff > 0
        online = aff_on and a.entropy == "online"
        # the online entropy estimate reads every layer's q, k of this forward (no extra pass)
        qk_layers = range(0 if online else a.layer_index, L) if aff_on else ()
        with amp_ctx:
            out = model(images, qk_layers=qk_layers)
        losses = {"cls": classification_loss(out.cls_logits, y), "patch": classification_loss(out.patch_logits, y)}
        if not aff_on:
            return losses
        if online:
            q = torch.stack([out.qk[i][0].detach() for i in range(L)])
            k = torch.stack([out.qk[i][1].detach() for i in range(L)])
            estimate = layer_entropy_bits(F.relu(out.cam.detach().float()), q, k, y, bare.attn_scale, cfg.impl)
            bare.update_layer_entropy(estimate.mean(dim=1), a.entropy_momentum)
        label = self.pseudo_labels(bare, images, y, valid, cfg)
        token_label = F.interpolate(label[:, None].float(), size=out.cam.shape[-2:], mode="nearest")[:, 0].long()
        _, loss_w = bare.layer_weights(a.entropy)
        terms = []
        for i in range(a.layer_index, L):
            q, k = out.qk[i]
            loss = masked_sigmoid_affinity_loss_qk(q[:, :, C:], k[:, :, C:], token_label, ignore_index=IGNORE,
                                                   ignore_diagonal=False, scale=bare.attn_scale, impl=cfg.impl)
            terms.append(loss_w[i] * loss)
        losses["aff"] = a.w_aff * torch.stack(terms).mean()
        return losses


def build_loss_fn(cfg: Config, device):
    """The objective of ``cfg.model.method``: a callable returning the weighted loss terms."""
    if cfg.model.method == "baseline":
        return baseline_losses
    if cfg.model.method == "more":
        return MoReLosses(cfg, device)
    if cfg.model.method == "aream":
        return AReAMLosses(cfg, device)
    raise ValueError(f"model.method={cfg.model.method!r} has no training objective")
