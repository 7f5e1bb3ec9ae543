"""What ``python -m wsss.infer`` writes for a method: named exports, each a set of rows
(``raw``, ``crf``, ``par``) of per-image labels at the image's original size.

An export differs from a scored :class:`~wsss.methods.base.Protocol` row in one respect: the
labels keep ``IGNORE`` (255) where the method leaves a pixel uncertain (PAR with two background
scores, SPEC §3 steps 2–3), because a second-stage segmentation network skips those pixels; the
scoring rows count them as background. Everything else is the protocol's own computation, so an
exported row mapped 255 → 0 is what ``wsss.eval`` scores.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple


@dataclass
class Export:
    """One named export of a method.

    ``predict(model, batch, device, row)`` returns, for each item of ``batch`` (a list of data-set
    items), (H,W) int64 labels at the item's original image size (or a future of them, see
    ``wsss.eval.engine``): class indices 0..C, and ``IGNORE`` only in rows that say so. ``rows``: row key → what it
    is, the first being the default (``crf`` is the default instead when ``eval.crf`` is on).
    ``needs_image_labels``: the prediction reads the item's ground-truth ``cls_label`` (E1, PAR,
    AReAM); otherwise it reads only ``image`` and ``image_uint8``, so it runs on a test split or a
    folder of images."""

    name: str
    rows: Dict[str, str]
    predict: Callable
    needs_image_labels: bool
    description: str = ""

    def default_row(self, cfg) -> str:
        return "crf" if cfg.eval.crf and "crf" in self.rows else next(iter(self.rows))


def _with_crf(cfg, on: bool):
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, crf=on))


def protocol_export(make_protocol: Callable, cfg, needs_image_labels: bool,
                    extra: Optional[Dict[str, Tuple[str, Callable]]] = None) -> Export:
    """An :class:`Export` of the protocol ``make_protocol(cfg)`` builds: row ``raw`` is its first
    row, ``crf`` its CRF row (the protocol is built with ``eval.crf`` on only for that row, so the
    CRF runs only when asked for). ``extra``: more rows, key → (description, ``predict(model,
    batch, device)``)."""
    plain, with_crf = make_protocol(_with_crf(cfg, False)), make_protocol(_with_crf(cfg, True))
    crf_row = with_crf.rows[1]
    rows = {"raw": f"{plain.rows[0].name}: {plain.rows[0].note}", "crf": f"{crf_row.name}: {crf_row.note}"}
    extra = dict(extra or {})
    rows.update({key: text for key, (text, _) in extra.items()})

    def predict(model, batch, device, row: str):
        if row in extra:
            return extra[row][1](model, batch, device)
        protocol = with_crf if row == "crf" else plain
        name = protocol.rows[1 if row == "crf" else 0].name
        return [out[name] for out in protocol.predict(model, batch, device)]

    return Export(plain.name, rows, predict, needs_image_labels, plain.description)


__all__ = ["Export", "protocol_export"]
