"""The streaming inference engine (wsss.eval.engine): batched protocols, CRFs on a thread pool
beside the network, device-side confusion matrices, bounded memory — and the same numbers as
the per-image loop."""
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from wsss.config import load_config
from wsss.data.synthetic import make_synthetic_dataset
from wsss.eval import engine
from wsss.eval.metrics import ConfusionMatrix

from test_train import TINY


class _Items(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": i}


def _cfg(batch=3, crf_workers=2, workers=0):
    return load_config(None, ["device=cpu", f"eval.batch_size={batch}", f"eval.crf_workers={crf_workers}",
                              f"data.num_workers={workers}"])


def test_stream_batches_resolves_futures_in_order_and_bounds_what_is_pending():
    cfg = _cfg(batch=3, crf_workers=2)
    running, peak, lock = [0], [0], threading.Lock()

    def slow_square(v):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return v * v

    submitted, seen, sizes = [], [], []

    def predict(batch):
        sizes.append(len(batch))
        assert isinstance(batch, engine.Batch)
        outs = [{"sq": engine.crf_call(slow_square, item["index"])} for item in batch]
        submitted.extend(isinstance(o["sq"], Future) for o in outs)
        # never more than PENDING earlier batches wait for their CRFs
        assert len(submitted) - len(seen) <= (engine.PENDING + 1) * 3
        return outs

    def consume(item, out):
        seen.append((item["index"], out["sq"]))

    indices = [7, 1, 4, 0, 9, 3, 2]
    assert engine.stream(_Items(10), indices, predict, consume, cfg, "cpu") == 7
    assert seen == [(i, i * i) for i in indices]  # in order, futures resolved
    assert sizes == [3, 3, 1]
    assert all(submitted) and peak[0] <= 2  # on the pool, at most crf_workers at once
    # outside a stream (or with crf=False) the call runs inline
    assert engine.crf_call(slow_square, 3) == 9
    inline = []
    engine.stream(_Items(4), range(4), lambda b: [{"sq": engine.crf_call(slow_square, 2)} for _ in b],
                  lambda item, out: inline.append(out["sq"]), cfg, "cpu", crf=False)
    assert inline == [4, 4, 4, 4]


def test_stream_with_loader_workers_keeps_order():
    cfg = _cfg(batch=2, crf_workers=1, workers=2)
    got = []
    engine.stream(_Items(9), range(9), lambda b: [item["index"] for item in b], lambda item, r: got.append(r),
                  cfg, "cpu")
    assert got == list(range(9))


def test_batch_memo_computes_once_per_batch():
    batch, calls = engine.Batch([{"a": 1}, {"a": 2}]), []
    for _ in range(3):
        assert batch.memo("k", lambda: calls.append(1) or "value") == "value"
    assert calls == [1]
    assert engine.as_batch(batch) is batch and engine.as_batch({"a": 1}) == [{"a": 1}]


def test_confusion_on_the_device_path_equals_the_checked_path_and_reports_bad_labels_on_read():
    g = torch.Generator().manual_seed(0)
    K = 5
    checked, deferred = ConfusionMatrix(K), ConfusionMatrix(K)
    kept = 0
    for _ in range(4):
        gt = torch.randint(0, K, (13, 17), generator=g)
        gt[torch.rand(13, 17, generator=g) < 0.2] = 255
        pred = torch.randint(0, K, (13, 17), generator=g)
        kept += int((gt != 255).sum())
        checked.update(pred, gt)
        deferred._update_deferred(pred.reshape(-1), gt.reshape(-1))  # what a CUDA tensor takes
    np.testing.assert_array_equal(deferred.matrix, checked.matrix)
    assert deferred.matrix.sum() == kept
    assert deferred.miou() == checked.miou()

    bad = ConfusionMatrix(3)
    bad._update_deferred(torch.tensor([0, 1, 7]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="pred holds labels outside 0..2"):
        bad.matrix
    bad = ConfusionMatrix(3)
    bad._update_deferred(torch.tensor([0, 1, 2]), torch.tensor([0, 9, 255]))
    with pytest.raises(ValueError, match="gt holds labels outside 0..2 and 255"):
        bad.miou()
    ok = ConfusionMatrix(3)  # ignored ground truth is not a bad label, whatever is predicted there
    ok._update_deferred(torch.tensor([0, 1, 9]), torch.tensor([0, 1, 255]))
    assert ok.matrix.sum() == 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from wsss.train.loop import train

    root = make_synthetic_dataset(tmp_path_factory.mktemp("engine"), seed=5, num_train=5, num_val=7, size=64,
                                  num_classes=3)
    run = tmp_path_factory.mktemp("engine_run")
    overrides = TINY + [f"data.root={root}", f"run_dir={run}", "model.method=more", "model.num_reg_tokens=1",
                        "train.max_iters=2", "loss.starts.seg=0.5", "train.ckpt_interval=2", "eval.val_images=0",
                        "eval.train_images=0", "eval.crf=true", "eval.input_size=64", "eval.scales=[1.0,1.25]",
                        "eval.protocols=[E1-CAM,E1-LAM,E2,E3,extra-CAM]", "eval.lam_seg_scales=[1.0,0.5]",
                        "eval.panels=0"]
    return overrides, train(load_config(None, overrides))


def test_engine_gives_the_per_image_loop_numbers(trained, tmp_path):
    """Batches of 3 over images of different sizes, 2 loader workers, CRFs on 2 threads: every
    row's confusion matrix equals the per-image loop's (batch 1, no workers, CRF inline)."""
    from wsss.eval.evaluate import evaluate

    overrides, ckpt = trained
    loop = evaluate(load_config(None, overrides + ["eval.batch_size=1", "data.num_workers=0",
                                                   "eval.crf_workers=1"]), ckpt, tmp_path / "loop")
    fast = evaluate(load_config(None, overrides + ["eval.batch_size=3", "data.num_workers=2",
                                                   "eval.crf_workers=2"]), ckpt, tmp_path / "engine")
    assert [r["result"] for r in fast["table"]] == [r["result"] for r in loop["table"]]
    assert len(loop["table"]) == 10  # E1 CAM/LAM, E2, E3 raw + CRF, extra-CAM's two rows
    for a, b in zip(loop["table"], fast["table"]):
        assert abs(a["miou"] - b["miou"]) < 1e-9 and abs(a["pixel_acc"] - b["pixel_acc"]) < 1e-9, a["result"]
    assert set(fast["wall_seconds"]) == {"train", "val"}
    md = (tmp_path / "engine" / "results.md").read_text()
    assert "val split: 7 images in" in md and "batches of 3, CRFs beside the network" in md


def test_crf_labels_inside_the_pool_equal_inline(trained):
    from wsss.methods.base import cam_crf_labels

    overrides, _ = trained
    cfg = load_config(None, overrides)
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (21, 30, 3), dtype=torch.uint8, generator=g)
    cam = torch.rand(3, 21, 30, generator=g)
    classes = torch.tensor([0, 2])
    inline = cam_crf_labels(image, cam, classes, cfg)
    assert isinstance(inline, torch.Tensor)
    with engine.crf_pool(2):
        assert engine.crf_threads() == 1
        pooled = cam_crf_labels(image, cam, classes, cfg)
        assert isinstance(pooled, Future)
        torch.testing.assert_close(pooled.result(), inline)
    assert set(torch.unique(inline).tolist()) <= {0, 1, 3}  # background and the present classes + 1
