"""The one config system of wsss: typed dataclasses, YAML files and dotted CLI overrides.

``load_config("configs/voc.yaml", ["train.max_iters=100", "model.gcr=false"])`` reads the
file, applies the overrides (values parsed as YAML scalars/lists) and validates every key
and type. An unknown key or a value of the wrong type raises :class:`ConfigError` listing the
valid keys of that section. Train, eval and the benchmarks all use it.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


@dataclass
class DataConfig:
    dataset: str = "voc"  # voc | coco (the synthetic set uses the VOC layout)
    root: str = "data/VOC2012"
    cls_labels: str = ""  # image-level label file; empty = <root>/cls_labels.npy (or _onehot)
    train_split: str = "train_aug"
    val_split: str = "val"
    crop_size: int = 448
    aug: str = "more"  # more (random-resized crop) | toco (rescale + crop with ignore fill) | coco (SPEC §3.0)
    # | timm (AReAM, SPEC §5: timm's ImageNet training transform)
    num_workers: int = 4
    eval_resize: int = 0  # periodic validation resizes images to this size (0 = crop_size)


@dataclass
class ModelConfig:
    method: str = "more"  # a name of wsss.methods.METHODS: more | baseline | aream
    backbone: str = "vit_base_patch16_224"  # named shape; the fields below override it if > 0
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    patch_size: int = 0
    img_size: int = 0  # pretraining grid of pos_embed (0 = from backbone name)
    num_reg_tokens: int = 4
    aux_layer: int = -3
    gcr: bool = True
    drop_path: float = 0.0
    decoder_dim: int = 512  # width of the LargeFOV decoder's dilated convs
    pretrained: str = ""  # local ImageNet checkpoint (timm/DeiT/ViT .pth/.safetensors)


@dataclass
class OptimConfig:
    lr: float = 6e-5
    head_lr_mult: float = 10.0  # classifier, GCR and decoder learn 10x faster (SPEC 3.7)
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup: float = 0.075  # fraction of max_iters with linear warm-up (1 500 / 20 000)
    warmup_ratio: float = 1e-6
    power: float = 0.9  # poly schedule exponent
    schedule: str = "poly"  # poly (MoRe) | cosine (per iteration) | cosine_epoch (AReAM, SPEC §5)
    min_lr_ratio: float = 0.0  # cosine: the lr decays to min_lr_ratio x base lr
    # AReAM / MCTformer (SPEC §5, the official run script with timm's functions):
    groups: str = "model"  # model: the model's param_groups() (MoRe's five, head_lr_mult) | no_decay: timm's
    # param_groups_weight_decay (weight decay 0 for biases, 1-D norm weights and model.no_weight_decay())
    lr_base_batch: int = 0  # > 0: the lr is lr x global batch / lr_base_batch (DeiT: 5e-4 x batch / 512)
    # cosine_epoch: timm's CosineLRScheduler in epochs, its value changing once per epoch
    warmup_epochs: int = 0  # linear warm-up epochs from warmup_lr
    warmup_lr: float = 1e-6
    min_lr: float = 0.0  # the cosine's end value (absolute, not a ratio)


@dataclass
class TrainConfig:
    max_iters: int = 20000
    batch_size: int = 4  # per process; global batch = batch_size x world size
    cam2mask: float = 0.5  # fraction after which CLE/UNE use the main labels (10 000)
    log_interval: int = 50
    eval_interval: int = 2000
    eval_start: float = 0.0  # periodic validation only from this fraction of max_iters on (COCO: 60 000)
    ckpt_interval: int = 2000
    keep_checkpoints: bool = False  # also keep checkpoint_<step>.pt beside the latest checkpoint.pt
    grad_clip: float = 0.0  # 0 = off


@dataclass
class LossStarts:
    """When each staged loss joins (SPEC §3.0, §3.6), as a fraction f of ``train.max_iters``: the
    iterations ``<= round(f * max_iters)`` (0-based) run without the term, as the official
    ``if n_iter <= start`` warm-up tests; f = 0 adds it from the first iteration. cls, aux and tok
    always run. The weights stay in ``loss.w_*``. VOC: seg/reg after 2 000 of 20 000."""

    ptc: float = 0.0
    cle: float = 0.0
    une: float = 0.0
    seg: float = 0.1
    reg: float = 0.1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ConfigError(f"loss.starts.{f.name}: a fraction of train.max_iters >= 0, "
                                  f"got {getattr(self, f.name)!r}")


@dataclass
class LossConfig:
    w_aux: float = 1.0
    w_tok: float = 1.0
    w_ptc: float = 0.3
    w_cle: float = 0.2
    w_une: float = 0.1
    w_seg: float = 0.12
    w_reg: float = 0.05
    starts: LossStarts = field(default_factory=LossStarts)
    cle_temp: float = 0.5  # CLE temperature (UNE has none, SPEC §3.6)
    tok_temp: float = 0.07
    reg_weight: float = 1e-7  # DenseEnergyLoss internal weight
    reg_sigma_rgb: float = 15.0
    reg_sigma_xy: float = 100.0
    reg_scale: float = 0.5
    # Token-resolution pseudo labels (ignore_mid high/low) of SPEC §3 step 5. The aux labels of
    # UNE (before cam2mask) and ptc use cam.high_thre / cam.low_thre, as the refined labels do.
    cle_high: float = 0.5  # CLE labels from the aux CAM before cam2mask
    cle_low: float = 0.25
    main_high: float = 0.6  # CLE/UNE labels from the main CAM after cam2mask
    main_low: float = 0.35


@dataclass
class AReAMConfig:
    """AReAM (SPEC §5); used when ``model.method=aream``."""

    layer_index: int = 7  # refinement uses layers [0, layer_index), the affinity loss [layer_index, depth)
    score_l: float = 0.35  # constant background score of the low stack (alpha_1)
    score_h: float = 0.55  # ... of the high stack (alpha_2)
    aff_start: float = 1 / 6  # fraction of max_iters trained on classification only (10 of 60 epochs)
    w_aff: float = 0.1  # weight of the affinity loss: cls + w_aff * aff
    entropy: str = "offline"  # offline (entropy_file) | online (running estimate) | none (equal weights)
    entropy_file: str = ""  # written by python -m wsss.tools.layer_entropy
    entropy_momentum: float = 0.9  # online: weight of the old estimate in the running mean
    scales: List[float] = field(default_factory=lambda: [1.0])  # pseudo-label pass in training (+ flip)
    epoch_map: bool = True  # each epoch: val mAP of the class scores; the best epoch -> checkpoint_best.pt


@dataclass
class CamConfig:
    scales: List[float] = field(default_factory=lambda: [1.0, 0.5, 0.75, 1.5])
    bkg_thre: float = 0.5
    high_thre: float = 0.7
    low_thre: float = 0.25
    par_dilations: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    par_iters: int = 10
    par_down_scale: int = 2


@dataclass
class EvalConfig:
    """``wsss.eval`` and periodic validation (SPEC §4, §5). Defaults are the official protocols'."""

    protocols: List[str] = field(default_factory=list)  # by name (MoRe: E1-CAM E1-LAM E2 E3 extra-CAM
    # extra-LAM; AReAM: official analysis); empty = the method's official set
    input_size: int = 0  # square size images are resized to (official 448; 0 = data.crop_size)
    bkg_thre: float = 0.5  # background threshold of E1/E2 and of the validation columns
    scales: List[float] = field(default_factory=lambda: [1.0, 1.25, 1.5])  # E3 segmentation (max over scales)
    cam_scales: List[float] = field(default_factory=lambda: [1.0])  # E1 CAM/LAM (refine_with_multiscale: 7)
    lam_seg_scales: List[float] = field(default_factory=lambda: [1.0, 0.5, 0.75, 1.25, 1.5, 1.75, 2.0])  # E2
    bkg_sweep: List[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5, 0.6])  # extra rows only
    train_images: int = 0  # images of the train split for pseudo-label mIoU (0 = all)
    val_images: int = 0  # 0 = all
    crf: bool = False  # adds the dense-CRF variant of every protocol
    crf_iters: int = 10  # dense CRF of every official script (SPEC §4)
    crf_pos_xy_std: float = 1.0
    crf_pos_w: float = 3.0
    crf_bi_xy_std: float = 67.0
    crf_bi_rgb_std: float = 3.0
    crf_bi_w: float = 4.0
    panels: int = 4  # PNG panels written per evaluation
    batch_size: int = 8  # images per forward pass of wsss.eval / wsss.infer (scales and flips batched too)
    crf_workers: int = 0  # threads running CPU dense CRFs beside the forward passes (0 = torch's intra-op
    # threads); with a CUDA build the CRF of CUDA predictions runs on the GPU instead
    layerwise: bool = False  # AReAM: pseudo-label mIoU of each single layer's affinity (table + plot)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    aream: AReAMConfig = field(default_factory=AReAMConfig)
    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "off"  # off | bf16 | fp16
    tf32: bool = True  # CUDA: TF32 for fp32 matmuls and convolutions (wsss.utils.device.configure_precision)
    impl: str = "auto"  # kernels: auto | reference | triton
    compile: bool = False  # torch.compile the backbone (GPU; slow to warm up on a CPU)
    resume: str = ""  # checkpoint to resume from


_CHOICES = {
    "data.dataset": ("voc", "coco"),
    "data.aug": ("more", "toco", "coco", "timm"),
    "aream.entropy": ("offline", "online", "none"),
    "optim.schedule": ("poly", "cosine", "cosine_epoch"),
    "optim.groups": ("model", "no_decay"),
    "amp": ("off", "bf16", "fp16"),
    "impl": ("auto", "reference", "triton"),
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, where: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if origin in (list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any numeric spelling
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a float, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a float, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in _YAML11_BOOLS:
            return _YAML11_BOOLS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r} (YAML reads an unquoted on/off/yes/no "
                              "as a boolean: quote it)")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key '{where}'; valid keys{' of ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{where}.")
        else:
            kwargs[key] = _coerce(value, tp, where)
            choices = _CHOICES.get(where)
            if where == "model.method":  # the method registry is the one list of methods
                from wsss.methods import METHODS

                choices = tuple(METHODS)
            if choices and kwargs[key] not in choices:
                raise ConfigError(f"{where}: {kwargs[key]!r} is not one of {', '.join(choices)}")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


# YAML 1.1 spellings of booleans besides true/false: a command-line override keeps them as text
# (`amp=off`) and a bool field accepts them.
_YAML11_BOOLS = {"on": True, "off": False, "yes": True, "no": False, "y": True, "n": False}


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    if raw.strip().lower() in _YAML11_BOOLS:
        return key, raw.strip()
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key, value


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            loaded = yaml.safe_load(f)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return _build(Config, tree)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    tmp.replace(path)


def config_from_dict(values: dict) -> Config:
    return _build(Config, values)
