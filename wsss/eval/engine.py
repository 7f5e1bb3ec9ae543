"""The one streaming inference engine: ``wsss.eval``, periodic validation and ``wsss.infer``
run their per-image predictions through :func:`stream`.

- **Loading**: a ``DataLoader`` over this rank's images (``data.num_workers`` worker processes,
  pinned memory on CUDA) yields batches of ``eval.batch_size`` items; the protocols resize
  every image to their square input sizes and run each scale and its flip for the whole batch
  in one forward pass (``wsss.methods``: ``Protocol.predict(model, batch, device)``).
- **Dense CRF beside the network**: inside :func:`stream` the CRF calls of the protocols
  (:func:`crf_call`) go to a pool of ``eval.crf_workers`` threads (the op releases the GIL; one
  CPU thread each) and return futures, so the CRFs of one batch run while the next batch's
  forward passes do. CUDA predictions with a CUDA build of ``wsss._C`` run the CRF on the GPU.
- **Scoring on the device**: predictions stay where they were made; ``ConfusionMatrix``
  accumulates on that device and is read once at the end.
- **Bounded memory**: at most ``PENDING`` batches wait for their CRFs and the loader prefetches
  ``2 · data.num_workers`` batches, so memory does not grow with the data set (about
  ``(PENDING + 2 · workers + 1) · eval.batch_size`` images with their maps in flight).
"""
from __future__ import annotations

import contextvars
import os
from concurrent.futures import Future, ThreadPoolExecutor
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset

PENDING = 2  # batches whose CRFs may still be running while the next batch is predicted

_crf_pool: contextvars.ContextVar[Optional[ThreadPoolExecutor]] = contextvars.ContextVar("wsss_crf_pool",
                                                                                        default=None)


class Batch(list):
    """A list of data-set items with a per-batch ``memo`` that lets the protocols of one split
    share what they compute for the same images (E1 and the extra rows use the same maps)."""

    def __init__(self, items: Iterable[dict] = ()):
        super().__init__(items)
        self._memo: dict = {}

    def memo(self, key, fn: Callable[[], Any]):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


def collate(items: List[dict]) -> Batch:
    return Batch(items)


def as_batch(items) -> Batch:
    """``items`` as a :class:`Batch` (one item dict, or a sequence of them)."""
    if isinstance(items, Batch):
        return items
    return Batch([items] if isinstance(items, dict) else items)


def crf_call(fn: Callable, *args) -> Any:
    """``fn(*args)``, or a future of it when called inside :func:`stream` with a CRF pool."""
    pool = _crf_pool.get()
    return fn(*args) if pool is None else pool.submit(fn, *args)


def resolve(value):
    """``value`` with every future (from :func:`crf_call`) replaced by its result."""
    if isinstance(value, Future):
        return value.result()
    if isinstance(value, dict):
        return {k: resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v) for v in value]
    return value


def crf_workers(cfg) -> int:
    """Threads of the CRF pool: ``eval.crf_workers``, or torch's intra-op thread count."""
    return cfg.eval.crf_workers or max(1, torch.get_num_threads())


@contextmanager
def crf_pool(workers: int):
    """Inside the block :func:`crf_call` submits to ``workers`` threads (none for ``workers <= 1``:
    the CRF runs inline with all CPU threads)."""
    if workers <= 1:
        yield None
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsss-crf") as pool:
        token = _crf_pool.set(pool)
        try:
            yield pool
        finally:
            _crf_pool.reset(token)


def crf_threads() -> int:
    """CPU threads one CRF call uses: 1 inside a pool (the pool's threads run side by side), else
    0 (torch's intra-op threads)."""
    return 1 if _crf_pool.get() is not None else 0


def loader(dataset, indices: Sequence[int], batch_size: int, num_workers: int, device) -> DataLoader:
    """Batches (:class:`Batch`) of ``dataset[i]`` for ``i`` in ``indices``, in order."""
    workers = min(max(0, num_workers), len(indices)) if len(indices) else 0
    return DataLoader(Subset(dataset, list(indices)), batch_size=max(1, batch_size), shuffle=False,
                      num_workers=workers, collate_fn=collate, pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=False, prefetch_factor=2 if workers else None)


def stream(dataset, indices: Sequence[int], predict: Callable[[Batch], List[Any]],
           consume: Callable[[dict, Any], None], cfg, device, *, crf: bool = True) -> int:
    """Runs ``predict(batch) -> one result per item`` over ``dataset[indices]`` in batches and
    calls ``consume(item, result)`` for every item in order, its CRF futures resolved. With
    ``crf`` the CRFs run on a thread pool beside the next batches' forward passes. Returns the
    number of items."""
    n = 0
    workers = crf_workers(cfg) if crf else 1
    with crf_pool(workers):
        pending: deque = deque()

        def drain(keep: int) -> None:
            while len(pending) > keep:
                batch, results = pending.popleft()
                for item, result in zip(batch, results):
                    consume(item, resolve(result))

        for batch in loader(dataset, indices, cfg.eval.batch_size, cfg.data.num_workers, device):
            results = predict(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"predict returned {len(results)} results for a batch of {len(batch)}")
            pending.append((batch, results))
            n += len(batch)
            drain(PENDING)
        drain(0)
    return n


__all__ = ["Batch", "PENDING", "as_batch", "collate", "crf_call", "crf_pool", "crf_threads", "crf_workers",
           "loader", "resolve", "stream"]
