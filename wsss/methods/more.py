"""MoRe (AAAI 2025, SPEC §2–§4): the baseline plus GCR-enhanced class tokens, the LIR losses
(CLE, UNE), the class-token contrast and ToCo's patch-token contrast; evaluated by the four
official protocols E1 (CAM and LAM), E2 (LAM with predicted image labels) and E3."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from wsss.cam import cam_to_label, multi_scale_lam, multi_scale_maps
from wsss.kernels import masked_cosine_affinity_loss
from wsss.losses import (DenseEnergyLoss, classification_loss, cle_loss, seg_loss, token_regularization_loss,
                         une_loss)

from .base import IGNORE, Protocol, Row, Schedule, cam_crf_labels, image_size, resize_square, to_label_size
from .baseline import (BaselineMethod, eval_input_size, idle_decoder_term, refined_pseudo_labels, square_batch,
                       training_cams)
from .export import protocol_export


def _token_labels(cam_tokens, cls_label, high, low, invalid):
    """SPEC §3 step 5 on a CAM already resized to the token grid; IGNORE where ``invalid``."""
    label = cam_to_label(cam_tokens, cls_label, high_thre=high, low_thre=low, ignore_mid=True,
                         ignore_index=IGNORE)[1]
    return label.masked_fill_(invalid, IGNORE)


def _to_tokens(cam, size):
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)


STAGED_LOSSES = ("ptc", "cle", "une", "seg", "reg")  # the fields of config.LossStarts
TOKEN_LOSSES = ("cle", "une", "ptc")  # on the token-resolution pseudo labels (SPEC §3 step 5)
PIXEL_LOSSES = ("seg", "reg")  # on the PAR-refined full-resolution label (SPEC §3 step 3)


def active_weights(loss_cfg, schedule: Schedule, step: int) -> Dict[str, float]:
    """The terms of MoRe's total loss at iteration ``step`` (0-based) and their weights (SPEC §3.6,
    COCO's stages §3.0): cls, aux and tok always, each staged term once ``schedule`` has started
    it. A started term of weight 0 is listed (the recipe has it) but not computed."""
    weights = {"cls": 1.0, "aux": loss_cfg.w_aux, "tok": loss_cfg.w_tok}
    for name in STAGED_LOSSES:
        if schedule.started(name, step):
            weights[name] = getattr(loss_cfg, f"w_{name}")
    return weights


class MoReLosses:
    """MoRe's objective (SPEC §3 steps 4–6). Holds the energy loss module and the seeded
    generator UNE samples with, so a resumed run continues the same stream.

    Only the terms of ``active_weights`` with a weight > 0 are computed (and logged), and the
    pseudo labels only when a computed term needs them. cls, aux and tok always run, so the
    backbone, both classifiers and GCR always get a gradient; the decoder gets the zero of
    ``idle_decoder_term`` (logged as ``seg``) until seg or reg starts, as DDP needs."""

    def __init__(self, cfg, device):
        self.energy = None
        if cfg.loss.w_reg > 0:
            self.energy = DenseEnergyLoss(weight=cfg.loss.reg_weight, sigma_rgb=cfg.loss.reg_sigma_rgb,
                                          sigma_xy=cfg.loss.reg_sigma_xy, scale_factor=cfg.loss.reg_scale)
        # on the training device, so UNE draws its samples without a host round trip
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def __call__(self, model, batch, step: int, cfg, schedule: Schedule, amp_ctx):
        images, y, valid = batch["image"], batch["cls_label"], batch["valid"]
        lc = cfg.loss
        weights = active_weights(lc, schedule, step)
        on = {k for k, w in weights.items() if w > 0}
        if self.energy is None:
            on.discard("reg")
        token_terms, pixel_terms = on.intersection(TOKEN_LOSSES), on.intersection(PIXEL_LOSSES)
        if token_terms or pixel_terms:
            cam, cam_aux = training_cams(model, images, cfg)
        with amp_ctx:
            out = model(images, with_score_maps=False)
        losses = {
            "cls": classification_loss(out.cls_logits, y),
            "aux": lc.w_aux * classification_loss(out.aux_cls_logits, y),
            "tok": lc.w_tok * token_regularization_loss(out.class_tokens, lc.tok_temp),
        }
        if token_terms:
            size = out.patch_features.shape[-2:]
            invalid = F.interpolate(valid[:, None].float(), size=size, mode="nearest")[:, 0] <= 0
            aux_tokens = _to_tokens(cam_aux, size)
            # the aux labels (ptc; UNE before cam2mask) use the refined labels' thresholds (SPEC §3.0)
            l_aux = _token_labels(aux_tokens, y, cfg.cam.high_thre, cfg.cam.low_thre, invalid)
            if step < schedule.cam2mask:
                l_cle = _token_labels(aux_tokens, y, lc.cle_high, lc.cle_low, invalid)
                l_une = l_aux
            else:
                l_cle = l_une = _token_labels(_to_tokens(cam, size), y, lc.main_high, lc.main_low, invalid)
            feats = out.patch_features.float()
            # the token labels are in range by construction: the losses skip their label checks (host syncs)
            if "cle" in token_terms:
                losses["cle"] = weights["cle"] * cle_loss(out.class_tokens, feats, l_cle, y, lc.cle_temp,
                                                          check_labels=False)
            if "une" in token_terms:  # UNE has no temperature (SPEC §3.6)
                losses["une"] = weights["une"] * une_loss(out.class_tokens, feats, l_une, y, generator=self.generator,
                                                          check_labels=False)
            if "ptc" in token_terms:
                losses["ptc"] = weights["ptc"] * masked_cosine_affinity_loss(feats, l_aux, ignore_index=IGNORE,
                                                                              impl=cfg.impl)
        if pixel_terms:  # the PAR-refined label feeds only the segmentation and energy losses
            # "max_classes": counted by the training loop on the loader's host labels (no device read)
            label = refined_pseudo_labels(images, cam, y, valid, cfg, batch.get("max_classes"))
            seg = F.interpolate(out.seg_logits.float(), size=images.shape[-2:], mode="bilinear",
                                align_corners=False)
            if "seg" in pixel_terms:
                losses["seg"] = weights["seg"] * seg_loss(seg, label, IGNORE, check_labels=False)
            if "reg" in pixel_terms:
                losses["reg"] = weights["reg"] * self.energy(images, seg, label, roi=valid.float())
        else:
            losses["seg"] = idle_decoder_term(out)
        return losses


@torch.no_grad()
def predicted_image_labels(model, image: torch.Tensor, size: int, min_pixels: int = 4) -> torch.Tensor:
    """SPEC §4 E2: the classes of the segmentation head's argmax (background excluded) covering
    at least ``min_pixels`` pixels of the ``size × size`` input (logits upsampled to it, bilinear);
    if none, the classifier's ``cls_logits > 0``. (B,C) float."""
    out = model(resize_square(image, size), with_score_maps=False)
    return image_labels_from_logits(out.seg_logits, out.cls_logits, size, min_pixels)


def image_labels_from_logits(seg_logits: torch.Tensor, cls_logits: torch.Tensor, size: int,
                             min_pixels: int = 4) -> torch.Tensor:
    """:func:`predicted_image_labels` from a forward's segmentation and class logits."""
    C = cls_logits.shape[1]
    pred = to_label_size(seg_logits, (size, size)).argmax(dim=1)  # (B,S,S)
    counts = torch.stack([(pred == c + 1).flatten(1).sum(1) for c in range(C)], dim=1)  # (B,C)
    from_seg = (counts >= min_pixels).float()
    from_cls = (cls_logits > 0).float()
    use_seg = (pred > 0).flatten(1).any(1, keepdim=True)
    return torch.where(use_seg, from_seg, from_cls)


class MoReMethod(BaselineMethod):
    name = "more"
    gcr = True

    def objective(self, cfg, device):
        return MoReLosses(cfg, device)

    def config_problems(self, cfg) -> List[str]:
        from wsss.utils.preflight import extension_problem

        if cfg.loss.w_reg > 0:
            return extension_problem(f"loss.w_reg={cfg.loss.w_reg:g} (DenseCRF regularized loss)")
        return []

    def describe_schedule(self, schedule: Schedule) -> str:
        by_start: Dict[int, List[str]] = {}
        for name in STAGED_LOSSES:
            by_start.setdefault(schedule.loss_starts.get(name, 0), []).append(name)
        stages = ", ".join(f"{'/'.join(names)} from iteration {it}" for it, names in sorted(by_start.items()))
        return f"cls/aux/tok from iteration 0, {stages}; CLE/UNE on the main CAM from iteration {schedule.cam2mask}"

    def default_protocols(self, cfg) -> List[str]:
        """SPEC §4's four; without GCR there is no LAM, so E1-CAM and E3."""
        return ["E1-CAM", "E1-LAM", "E2", "E3"] if cfg.model.gcr else ["E1-CAM", "E3"]

    def protocol_table(self, cfg) -> Dict:
        table = super().protocol_table(cfg)
        lam = {"E1-LAM": lambda: self._e1(cfg, "LAM"), "E2": lambda: self._e2(cfg),
               "extra-LAM": lambda: self._extra(cfg, "LAM")}
        if not cfg.model.gcr:  # refused when the protocols are chosen, before the model is loaded

            def no_lam(name):
                raise ValueError(f"eval.protocols: {name} reads the LAM, which needs a MoRe model with GCR "
                                 f"(model.gcr=true); without it: {', '.join(table)}")

            lam = {name: (lambda name=name: no_lam(name)) for name in lam}
        table.update(lam)
        return table

    def _maps(self, model, x, kind: str, scales, size):
        if kind == "LAM":
            if getattr(model, "graph_layer", None) is None:
                raise ValueError("the LAM protocols need a MoRe model with GCR (model.gcr=true)")
            return multi_scale_lam(model, x, scales, out_size=size)
        return super()._maps(model, x, kind, scales, size)

    def _e2(self, cfg) -> Protocol:
        """E2: the LAM as a segmentation with predicted image labels (val/test; SPEC §4)."""
        scales = tuple(cfg.eval.lam_seg_scales)
        S, bkg = eval_input_size(cfg), cfg.eval.bkg_thre
        raw = Row("E2 LAM segmentation, predicted labels (val)", f"{S}², scales {list(scales)} + flip, bkg {bkg:g}")
        rows = [raw]
        if cfg.eval.crf:
            rows.append(Row("E2 LAM segmentation + CRF, predicted labels (val)", "crf_post, dense CRF t=10 1/3/67/3/4"))

        def predict(model, batch, device):
            if getattr(model, "graph_layer", None) is None:
                raise ValueError("the LAM protocols need a MoRe model with GCR (model.gcr=true)")
            x = square_batch(batch, S, device)
            B = x.shape[0]
            # one forward of the S² images and their flips gives the predicted labels (first half)
            # and the LAM of the scale whose input is S² (the same images, not encoded again)
            out = model(torch.cat([x, x.flip(-1)]), with_score_maps=False)
            ys = image_labels_from_logits(out.seg_logits[:B], out.cls_logits[:B], S)
            lam_s = torch.einsum("bdhw,bcd->bchw", out.patch_features, out.class_tokens)

            def lam(z):  # multi_scale_maps passes the unresized images (+ flips) at scale sizes equal to S²
                return lam_s if z.shape[-2:] == x.shape[-2:] else model.lam(z)

            maps = multi_scale_maps(lam, x, scales, model.patch_size, (S, S), relu=False)
            outs = []
            for i, item in enumerate(batch):
                valid, lab = cam_to_label(to_label_size(maps[i:i + 1], image_size(item)), ys[i:i + 1], bkg_thre=bkg)
                out = {raw.name: lab[0]}
                if cfg.eval.crf:
                    out[rows[1].name] = cam_crf_labels(item["image_uint8"], valid[0], torch.nonzero(ys[i] > 0).flatten(),
                                                       cfg)
                outs.append(out)
            return outs

        return Protocol("E2", "val", rows, predict, "LAM with predicted image labels (infer_lam_test_75)")

    def exports(self, cfg) -> Dict:
        """The baseline's, and with GCR E1-LAM (+ PAR) and E2 (wsss.methods.export)."""
        table = super().exports(cfg)
        if cfg.model.gcr:
            table.update({"E1-LAM": self._e1_export(cfg, "LAM"),
                          "E2": protocol_export(self._e2, cfg, needs_image_labels=False)})
        return table

    def default_export(self, cfg):
        """E2, MoRe's segmentation of unseen images (SPEC §4); E3 without GCR (no LAM)."""
        return "E2" if cfg.model.gcr else "E3"

    def panel(self, model, item, cfg, device):
        maps, titles = super().panel(model, item, cfg, device)
        if getattr(model, "graph_layer", None) is not None:
            image = item["image"][None].to(device)
            y = item["cls_label"][None, :, None, None].to(device)
            lam = multi_scale_lam(model, image, (1.0,), out_size=image_size(item)) * y
            maps.append(lam[0].amax(0).cpu().numpy())
            titles.append("LAM")
        return maps, titles
