"""Device, precision and seeding helpers shared by train, eval and benchmarks."""
import contextlib
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available")
    return dev


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp={amp!r} is not one of {', '.join(AMP_DTYPES)}")
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs a CUDA device; use amp=bf16 on the CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_precision(device, tf32: bool = True) -> None:
    """TF32 for the fp32 matmuls and cuDNN convolutions on a CUDA ``device`` (config ``tf32``):
    tensor-core speed with a 10-bit mantissa; ``tf32=False`` keeps full fp32. Process-wide,
    set once by the train and eval entry points; nothing changes on other devices. ``amp``
    (bf16/fp16 autocast) is independent of it, and the losses keep computing in fp32 dtype."""
    if torch.device(device).type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = bool(tf32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
