"""Every shipped recipe, run through the real command line as a user types it, shrunk.

For each ``configs/*.yaml`` (a config added later is picked up by the glob) and each world size:

* world 1: ``python -m wsss.train --cfg configs/X.yaml <size overrides>`` through every loss
  stage of the recipe and one periodic validation -> ``python -m wsss.eval`` on its checkpoint
  -> ``resume=`` from the mid-run checkpoint for the remaining steps;
* world 2: the same training under ``torchrun --nproc_per_node=2 -m wsss.train`` (gloo; the
  README's "Training at scale" command) -> ``torchrun ... -m wsss.eval`` (sharded) -> its
  checkpoint holds what the world-1 one does -> resume under torchrun; for one recipe per
  method, the world-1 run's final checkpoint validated
  by two processes must give the world-1 run's validation mIoU
  (see ``_check_validation_matches_one_process``).

A recipe of several commands is run as its header writes it: an AReAM config with
``aream.entropy: offline`` first trains the classifier (``aream.w_aff=0 aream.entropy=none
run_dir=<dir of entropy_file>``) and runs ``python -m wsss.tools.layer_entropy`` to write
``aream.entropy_file`` before the AReAM training (once; both world sizes' AReAM runs read it).

Only sizes are overridden: backbone width/depth/heads/patch/grid, crop, batch, iterations,
image counts, CAM/PAR scales and iterations, loader workers, device, run_dir and the intervals
(validation, checkpoint, log). Loss weights, methods, thresholds, entropy mode, eval.crf and
the other recipe choices stay as shipped. Each run gets its own working directory holding
``configs`` (a link to the repository's), the data sets at the config's ``data.root`` and a
tiny timm-format ViT checkpoint at the config's ``model.pretrained``, so the config's own paths
are used as shipped. ``train.keep_checkpoints=true`` keeps the mid-run checkpoint to resume.

Wall times of every command are printed (``pytest -s``) and summarised at the end.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from recipe_data import make_coco_public, make_tiny_pretrained, make_voc
from wsss.config import Config, load_config
from wsss.methods.base import stage_first_iteration
from wsss.models.vit import backbone_shape

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# The shrunk model (every recipe) and data.
SHAPE = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8, "img_size": 32}
CROP = 32  # a multiple of the patch (AReAM needs it)
BATCH = 2  # per process
DECODER_DIM = 16
NUM_TRAIN, NUM_VAL, IMAGE_SIZE = 8, 3, 48  # NUM_VAL odd: two validation shards are uneven (2 + 1)
MIN_ITERS = 6
TIMEOUT_S = 300  # one command; a hang (a rank stuck in a collective) fails instead of blocking CI
STDERR_LINES = 40

TIMES: List[tuple] = []  # (label, seconds, exit code)


# ----------------------------------------------------------------------------------------------
# The plan of one recipe: iterations, stage thresholds and the size overrides
# ----------------------------------------------------------------------------------------------

def _stage_fractions(cfg: Config) -> Dict[str, float]:
    """The loss-stage switches of the method, as fractions of ``train.max_iters``."""
    if cfg.model.method == "aream":
        return {"aream.aff_start": cfg.aream.aff_start} if cfg.aream.w_aff > 0 else {}
    starts = {f"loss.starts.{k}": f for k, f in dataclasses.asdict(cfg.loss.starts).items() if f > 0}
    return {**starts, "train.cam2mask": cfg.train.cam2mask}


def _first_iteration(key: str, fraction: float, n: int) -> int:
    """First (0-based) iteration of a stage at ``n`` iterations: a staged loss joins after
    iteration round(f·n) (``stage_first_iteration``), cam2mask / aff_start at round(f·n)."""
    return stage_first_iteration(fraction, n) if key.startswith("loss.starts.") else int(round(fraction * n))


def _iterations(fractions: Dict[str, float]) -> int:
    """The fewest iterations (>= MIN_ITERS) at which every stage switch of the config, left as
    shipped, falls strictly inside the run: some step before and some step after each (the loop
    turns cam2mask/aff_start on at ``step >= round(f * max_iters)`` and a staged loss after
    iteration ``round(f * max_iters)``, see ``_first_iteration``)."""
    for n in range(MIN_ITERS, 2000):
        if all(1 <= _first_iteration(k, f, n) <= n - 1 for k, f in fractions.items()):
            return n
    raise AssertionError(f"no run length puts every stage switch {fractions} inside the run")


@dataclass
class Recipe:
    path: Path
    cfg: Config
    iters: int
    eval_every: int  # one periodic validation at this step, the final one at `iters`
    switches: Dict[str, int]  # stage key -> first iteration (0-based) of the stage
    size_overrides: List[str]
    links: Dict[str, str] = field(default_factory=dict)  # config path -> fixture name

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def cfg_arg(self) -> str:
        return f"configs/{self.path.name}"

    @property
    def stages(self) -> Optional[dict]:
        """The commands a multi-stage recipe runs before its main training, or None."""
        a = self.cfg.aream
        if self.cfg.model.method == "aream" and a.entropy == "offline":
            out = Path(a.entropy_file)
            return {"cls_run_dir": str(out.parent), "entropy_file": str(out)}
        return None


def make_recipe(path: Path) -> Recipe:
    cfg = load_config(path)
    fractions = _stage_fractions(cfg)
    n = _iterations(fractions)
    eval_every = n - 2  # its next multiple, 2n - 4 >= n, is past the end: exactly one periodic validation
    ov = [f"model.{k}={v}" for k, v in SHAPE.items()]
    if cfg.model.method in ("more", "baseline"):
        ov.append(f"model.decoder_dim={DECODER_DIM}")
    if cfg.model.method == "aream":
        # the layer split at the same relative depth, inside [1, depth - 1]
        depth0 = backbone_shape(cfg.model.backbone, cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads,
                                cfg.model.patch_size, cfg.model.img_size)[1]
        li = min(SHAPE["depth"] - 1, max(1, round(cfg.aream.layer_index * SHAPE["depth"] / depth0)))
        ov.append(f"aream.layer_index={li}")
        ov.append("aream.scales=[1.0]")
    ov += [f"data.crop_size={CROP}", "data.num_workers=0", f"train.batch_size={BATCH}", f"train.max_iters={n}",
           f"train.eval_interval={eval_every}", "train.eval_start=0", f"train.ckpt_interval={eval_every}",
           "train.log_interval=1",
           "train.keep_checkpoints=true", "cam.scales=[1.0]", "cam.par_dilations=[1,2]", "cam.par_iters=2",
           "eval.scales=[1.0]", "eval.cam_scales=[1.0]", "eval.lam_seg_scales=[1.0]", f"eval.input_size={CROP}",
           f"eval.val_images={NUM_VAL}", "eval.train_images=2",
           "device=cpu"]
    if cfg.data.eval_resize:
        ov.append(f"data.eval_resize={CROP}")
    links = {}
    data = "coco" if cfg.data.dataset == "coco" else "voc"
    if Path(cfg.data.root).is_absolute():
        ov.append(f"data.root={{{data}}}")  # filled in per run
    else:
        links[cfg.data.root] = data
    if cfg.model.pretrained:
        if Path(cfg.model.pretrained).is_absolute():
            ov.append("model.pretrained={pretrained}")
        else:
            links[cfg.model.pretrained] = "pretrained"
    switches = {k: _first_iteration(k, f, n) for k, f in fractions.items()}
    return Recipe(path, cfg, n, eval_every, switches, ov, links)


RECIPES = [make_recipe(p) for p in CONFIGS]


# ----------------------------------------------------------------------------------------------
# Running commands
# ----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, n: int = STDERR_LINES) -> str:
    """The end of a command's stderr; under torchrun the workers' own lines (``[rankN]:``, the
    traceback of the failure) first, since torchrun's summary follows them."""
    lines = text.rstrip().splitlines()
    ranks = [line for line in lines if line.startswith("[rank")]
    if ranks:
        return "\n".join(ranks[-n:] + ["..."] + lines[-8:])
    return "\n".join(lines[-n:])


def run_cmd(label: str, argv: List[str], cwd: Path, world: int = 1) -> subprocess.CompletedProcess:
    """One command as a user types it in ``cwd``; exit code 0 or an AssertionError that holds
    the command line and the end of its stderr."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the test suite's switch (conftest), not a user's
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if world > 1:
        env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    t0 = time.time()
    try:
        p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        dt = time.time() - t0
        TIMES.append((label, dt, "timeout"))
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"{label}: timed out after {TIMEOUT_S}s\n  (cd {cwd} && {shlex.join(argv)})\n"
                             f"--- stderr (last {STDERR_LINES} lines) ---\n{_tail(stderr)}") from None
    dt = time.time() - t0
    TIMES.append((label, dt, p.returncode))
    print(f"\n[recipes] {dt:6.1f}s rc={p.returncode} {label}: {shlex.join(argv)}", flush=True)
    if p.returncode != 0:
        raise AssertionError(f"{label}: exit code {p.returncode}\n  (cd {cwd} && {shlex.join(argv)})\n"
                             f"--- stderr (last {STDERR_LINES} lines) ---\n{_tail(p.stderr)}")
    return p


def _argv(module: str, world: int) -> List[str]:
    if world == 1:
        return [PYTHON, "-m", module]
    return [TORCHRUN, f"--nproc_per_node={world}", f"--master_port={_free_port()}", "-m", module]


def train_argv(world: int) -> List[str]:
    return _argv("wsss.train", world)


def eval_argv(world: int) -> List[str]:
    return _argv("wsss.eval", world)


def read_metrics(run_dir: Path) -> Dict[str, Dict[int, float]]:
    """metrics.csv as {name: {step: value}}."""
    out: Dict[str, Dict[int, float]] = {}
    with open(run_dir / "metrics.csv") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["name"], {})[int(r["step"])] = float(r["value"])
    return out


def ckpt_step(path: Path) -> int:
    assert path.is_file(), f"checkpoint {path} was not written"
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


class Findings:
    """Independent checks of one test: each failure is collected, the test fails at the end with
    all of them, so one broken step does not hide the next."""

    def __init__(self):
        self.failures: List[str] = []

    @contextlib.contextmanager
    def check(self, what: str):
        try:
            yield
        except AssertionError as e:
            self.failures.append(f"[{what}] {e}")
        except Exception as e:  # e.g. a run that exited 0 without writing metrics.csv
            self.failures.append(f"[{what}] {type(e).__name__}: {e}")

    def raise_if_any(self):
        if self.failures:
            pytest.fail("\n\n".join(self.failures), pytrace=False)


# ----------------------------------------------------------------------------------------------
# Fixtures: data, the pretrained file, one working directory per (recipe, world)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("recipe_inputs")
    t0 = time.time()
    out = {"voc": make_voc(base / "voc", NUM_TRAIN, NUM_VAL, IMAGE_SIZE),
           "coco": make_coco_public(base / "coco", NUM_TRAIN, NUM_VAL, IMAGE_SIZE),
           "pretrained": make_tiny_pretrained(base / "vit_tiny_shrunk.pth", **SHAPE)}
    TIMES.append(("data sets + pretrained file (in the test process)", time.time() - t0, 0))
    return out


@pytest.fixture(scope="module", autouse=True)
def wall_time_report():
    t0 = time.time()
    yield
    lines = [f"{dt:7.1f}s  {rc!s:>7}  {label}" for label, dt, rc in TIMES]
    print("\n[recipes] wall time per command (s, exit code, command):\n" + "\n".join(lines)
          + f"\n[recipes] module total {time.time() - t0:.1f}s", flush=True)


_WORKDIRS: Dict[tuple, Path] = {}
_TRAINED: Dict[tuple, object] = {}  # (recipe, world) -> run dir, or the AssertionError of its training


def workdir(recipe: Recipe, world: int, inputs, tmp_path_factory) -> Path:
    key = (recipe.name, world)
    if key not in _WORKDIRS:
        wd = tmp_path_factory.mktemp(f"{recipe.name}_w{world}")
        (wd / "configs").symlink_to(REPO / "configs", target_is_directory=True)
        for rel, what in recipe.links.items():
            dst = wd / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(inputs[what])
        _WORKDIRS[key] = wd
    return _WORKDIRS[key]


def sizes(recipe: Recipe, inputs) -> List[str]:
    return [o.format(**{k: str(v) for k, v in inputs.items()}) for o in recipe.size_overrides]


def run_recipe_stages(recipe: Recipe, inputs, tmp_path_factory) -> None:
    """The config header's earlier stages (AReAM offline: 1. classifier, 2. layer entropies), once,
    in the world-1 working directory; a world-2 directory links their run_dir. Two processes
    would train stage 1 through the code path stage 3's iterations before ``aff_start`` take."""
    stages = recipe.stages
    key = (recipe.name, "stages")
    if stages is None or key in _TRAINED:
        if isinstance(_TRAINED.get(key), BaseException):
            raise AssertionError(f"(the {recipe.name} stages 1-2 failed earlier)\n{_TRAINED[key]}")
        return
    wd = workdir(recipe, 1, inputs, tmp_path_factory)
    ov = sizes(recipe, inputs)
    try:
        run_cmd(f"{recipe.name} stage 1 (classifier)", train_argv(1) + [
            "--cfg", recipe.cfg_arg, *ov, "aream.w_aff=0", "aream.entropy=none",
            f"run_dir={stages['cls_run_dir']}"], wd)
        run_cmd(f"{recipe.name} stage 2 (layer entropy)", [
            PYTHON, "-m", "wsss.tools.layer_entropy", "--cfg", recipe.cfg_arg,
            "--ckpt", f"{stages['cls_run_dir']}/checkpoint.pt", "--out", stages["entropy_file"], *ov], wd)
        assert (wd / stages["entropy_file"]).is_file(), f"{stages['entropy_file']} was not written"
    except AssertionError as e:
        _TRAINED[key] = e
        raise
    _TRAINED[key] = wd / stages["cls_run_dir"]


def run_recipe_training(recipe: Recipe, world: int, inputs, tmp_path_factory) -> Path:
    """The recipe's training under ``world`` processes (after its earlier stages), once per
    module; returns the run's directory (absolute). A failure is re-raised for every caller."""
    key = (recipe.name, world)
    if key in _TRAINED:
        if isinstance(_TRAINED[key], BaseException):
            raise AssertionError(f"(the {recipe.name} world-{world} training failed earlier)\n{_TRAINED[key]}")
        return _TRAINED[key]
    wd = workdir(recipe, world, inputs, tmp_path_factory)
    try:
        run_recipe_stages(recipe, inputs, tmp_path_factory)
        if recipe.stages is not None and world > 1:
            link = wd / recipe.stages["cls_run_dir"]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(_TRAINED[(recipe.name, "stages")], target_is_directory=True)
        run_cmd(f"{recipe.name} w{world} train", train_argv(world) + ["--cfg", recipe.cfg_arg,
                                                                      *sizes(recipe, inputs)], wd, world)
    except AssertionError as e:
        _TRAINED[key] = e
        raise
    _TRAINED[key] = wd / recipe.cfg.run_dir
    return _TRAINED[key]


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def _check_training(recipe: Recipe, run: Path) -> None:
    n, e = recipe.iters, recipe.eval_every
    assert ckpt_step(run / "checkpoint.pt") == n, "final checkpoint.pt is not at the last step"
    assert ckpt_step(run / f"checkpoint_{e:06d}.pt") == e, "mid-run checkpoint has the wrong step"
    log = (run / "train.log").read_text()
    for step in (e, n):
        assert f"step {step} validation mIoU" in log, f"train.log has no validation mIoU at step {step}:\n{_tail(log)}"
    m = read_metrics(run)
    # AReAM's per-epoch val/mAP (SPEC §5, checkpoint_best) is logged every epoch, apart from
    # the periodic mIoU validation
    epoch_rows = {"val/mAP"}
    if recipe.cfg.model.method == "aream" and recipe.cfg.aream.epoch_map:
        assert m.get("val/mAP"), "AReAM logged no per-epoch val/mAP"
        assert (run / "checkpoint_best.pt").is_file(), "AReAM wrote no checkpoint_best.pt"
    val_steps = {s for k, v in m.items() if k.startswith("val/") and k not in epoch_rows for s in v}
    assert val_steps == {e, n}, f"validation rows at steps {sorted(val_steps)}, expected one periodic ({e}) + final ({n})"
    assert sorted(m["loss/total"]) == list(range(1, n + 1)), f"loss/total logged at {sorted(m['loss/total'])}"
    assert all(math.isfinite(v) for v in m["loss/total"].values())
    # every loss stage ran: the term a stage adds is logged exactly from its first iteration on
    # (a row at logged step s is the loss of iteration s - 1)
    if recipe.cfg.model.method == "aream" and "aream.aff_start" in recipe.switches:
        first = recipe.switches["aream.aff_start"]
        assert set(m.get("loss/aff", {})) == set(range(first + 1, n + 1)), \
            f"loss/aff at {sorted(m.get('loss/aff', {}))}, expected from iteration {first}"
    if recipe.cfg.model.method == "more" and recipe.cfg.loss.w_reg > 0 and "loss.starts.reg" in recipe.switches:
        first = recipe.switches["loss.starts.reg"]
        assert set(m.get("loss/reg", {})) == set(range(first + 1, n + 1)), \
            f"loss/reg at {sorted(m.get('loss/reg', {}))}, expected from iteration {first}"


def _check_eval(out: Path) -> None:
    md = out / "results.md"
    assert md.is_file(), f"{md} was not written"
    assert "| result | mIoU |" in md.read_text(), f"{md} holds no result table:\n{md.read_text()[:2000]}"


def _check_same_checkpoint_format(w1_run: Path, w2_run: Path) -> None:
    a = torch.load(w1_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(w2_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert sorted(a) == sorted(b), f"checkpoint entries: 1 process {sorted(a)}, 2 processes {sorted(b)}"
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes(a["model"]) == shapes(b["model"]), \
        f"model keys/shapes differ: only 1-process {sorted(set(a['model']) - set(b['model']))[:8]}, " \
        f"only 2-process {sorted(set(b['model']) - set(a['model']))[:8]}"
    for key in ("num_classes", "class_names", "config"):
        assert a.get(key) is not None and (key == "config" or a[key] == b[key]), key


def _check_resume(recipe: Recipe, full: Path, resumed: Path) -> None:
    n, e = recipe.iters, recipe.eval_every
    assert ckpt_step(resumed / "checkpoint.pt") == n, "the resumed run's final checkpoint is not at the last step"
    assert f"resumed from" in (resumed / "train.log").read_text()
    a, b = read_metrics(full)["loss/total"], read_metrics(resumed)["loss/total"]
    assert sorted(b) == list(range(e + 1, n + 1)), f"resumed run logged steps {sorted(b)}, expected {e + 1}..{n}"
    # README: resume is exact (same batches, RNG streams and optimizer state)
    diffs = {s: (a[s], b[s]) for s in b if not math.isclose(a[s], b[s], rel_tol=1e-4, abs_tol=1e-6)}
    assert not diffs, f"resumed losses differ from the uninterrupted run's (step: (full, resumed)): {diffs}"


def _check_validation_matches_one_process(recipe: Recipe, w1_run: Path, validated: Path) -> None:
    """The world-1 run's final checkpoint, validated by two processes (``resume=`` of it with the
    same ``train.max_iters``: no step is trained, only the final validation runs), must give the
    mIoU the world-1 process computed for the same weights at the end of its own run. Same
    weights and the same images: sharded validation may only change which process computes
    which image, not the result. NUM_VAL is odd, so the shards are uneven: a sampler that pads
    them by repeating an image (DistributedSampler) or drops the tail changes the mIoU.
    Comparing two trainings instead would not be meaningful for MoRe/AReAM: their losses are not
    per-image means, so 1 x 2b and 2 x b images do not give the same weights."""
    n = recipe.iters
    ref = {k: v[n] for k, v in read_metrics(w1_run).items() if k.startswith("val/") and k != "val/mAP" and n in v}
    got = {k: v[n] for k, v in read_metrics(validated).items() if k.startswith("val/") and k != "val/mAP" and n in v}
    assert ref, f"no val/ rows at step {n} in {w1_run / 'metrics.csv'}"
    assert set(got) == set(ref), f"2-process validation rows {sorted(got)} != 1-process rows {sorted(ref)}"
    # 1e-4: both sides run the same arithmetic, but with 1 vs 2 threads per process; a dropped or
    # doubled image moves the mIoU of 3 images by far more
    bad = {k: (ref[k], got[k]) for k in ref if not math.isclose(ref[k], got[k], abs_tol=1e-4)}
    assert not bad, f"validation mIoU, 1 process vs 2 processes, same checkpoint: {bad}"


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------

def test_plans_cover_every_stage():
    """The shrunk plans themselves: every stage switch inside the run, one periodic validation."""
    assert {r.name for r in RECIPES} >= {"voc", "coco", "voc_aream", "demo", "demo_aream"}
    for r in RECIPES:
        assert 0 < r.eval_every < r.iters < 2 * r.eval_every, r.name
        for key, first in r.switches.items():
            assert 1 <= first <= r.iters - 1, (r.name, key, first)


# Validation by 1 vs 2 processes: one recipe per method (a demo config where there is one); the
# validation code differs by method only, and each comparison costs a torchrun start.
VALIDATION_COMPARED = {}
for _r in sorted(RECIPES, key=lambda r: (not r.name.startswith("demo"), r.name)):
    VALIDATION_COMPARED.setdefault(_r.cfg.model.method, _r.name)


@pytest.mark.parametrize("recipe,world", [(r, w) for r in RECIPES for w in (1, 2)],
                         ids=[f"{r.name}-world{w}" for r in RECIPES for w in (1, 2)])
def test_recipe(recipe: Recipe, world: int, inputs, tmp_path_factory):
    try:
        run = run_recipe_training(recipe, world, inputs, tmp_path_factory)
    except AssertionError as e:  # nothing else can run without the training
        pytest.fail(f"[training] {e}", pytrace=False)
    wd = workdir(recipe, world, inputs, tmp_path_factory)
    ov = sizes(recipe, inputs)
    tag = f"{recipe.name} w{world}"
    found = Findings()
    with found.check("training"):
        _check_training(recipe, run)
    with found.check("eval"):
        # README: `python -m wsss.eval ...`, and under torchrun sharded over the processes
        rel = run.relative_to(wd)
        run_cmd(f"{tag} eval", eval_argv(world) + ["--cfg", recipe.cfg_arg, "--ckpt", f"{rel}/checkpoint.pt", *ov,
                                                   f"run_dir={rel}"], wd, world)
        _check_eval(run / "eval")
    if world > 1:
        with found.check("the 2-process checkpoint holds what the 1-process one does"):
            _check_same_checkpoint_format(run_recipe_training(recipe, 1, inputs, tmp_path_factory), run)
    with found.check("resume"):
        rel = f"{run.relative_to(wd)}_resumed"
        mid = f"{run.relative_to(wd)}/checkpoint_{recipe.eval_every:06d}.pt"
        run_cmd(f"{tag} resume", train_argv(world) + ["--cfg", recipe.cfg_arg, *ov, f"run_dir={rel}",
                                                      f"resume={mid}"], wd, world)
        _check_resume(recipe, run, wd / rel)
    if world > 1 and VALIDATION_COMPARED.get(recipe.cfg.model.method) == recipe.name:
        with found.check("validation, 1 vs 2 processes"):
            w1_run = run_recipe_training(recipe, 1, inputs, tmp_path_factory)
            rel = f"{run.relative_to(wd)}_validate_world1_ckpt"
            run_cmd(f"{tag} validate world-1 checkpoint", train_argv(world) + [
                "--cfg", recipe.cfg_arg, *ov, f"run_dir={rel}", f"resume={w1_run / 'checkpoint.pt'}"], wd, world)
            _check_validation_matches_one_process(recipe, w1_run, wd / rel)
    found.raise_if_any()
