"""Mixed precision on the CPU: a short bf16 MoRe run with every loss on, the losses' fp32
guarantee under autocast, and the ``compile`` switch."""
import csv
import math

import pytest
import torch

from wsss.config import ConfigError, load_config
from wsss.data.synthetic import make_synthetic_dataset
from wsss.kernels import masked_cosine_affinity_loss
from wsss.losses import classification_loss, cle_loss, seg_loss, token_regularization_loss, une_loss

from conftest import DEVICE
from test_train import TINY


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), seed=2, num_train=8, num_val=1, size=64,
                                  num_classes=3)


def test_bf16_more_training_with_all_losses(data_root, tmp_path, monkeypatch):
    import wsss.train.loop as loop
    from wsss.methods import get_method

    initial = {}
    method = get_method("more")
    real_build = method.build_model

    def recording_build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(method, "build_model", recording_build)
    run = tmp_path / "bf16"
    # seg/reg stages at 0: the PAR-refined segmentation and energy losses run from the first step
    cfg = load_config(None, TINY + [f"data.root={data_root}", f"run_dir={run}", "model.method=more",
                                    "model.num_reg_tokens=2", "train.max_iters=3", "loss.starts.seg=0.0", "loss.starts.reg=0.0",
                                    "train.cam2mask=0.5", "train.ckpt_interval=3", "eval.val_images=1",
                                    "amp=bf16"])
    ckpt_path = loop.train(cfg)

    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["name"].startswith("loss/")]
    names = {r["name"] for r in rows}
    assert {"loss/seg", "loss/reg", "loss/cle", "loss/une", "loss/ptc", "loss/tok", "loss/total"} <= names
    assert sorted({int(r["step"]) for r in rows}) == [1, 2, 3]
    assert all(math.isfinite(float(r["value"])) for r in rows)

    assert ckpt_path.is_file()
    state = torch.load(ckpt_path, weights_only=True)["model"]
    assert state.keys() == initial.keys()
    floats = [k for k, v in initial.items() if v.is_floating_point()]
    assert all(state[k].dtype == torch.float32 for k in floats)  # autocast never casts the weights
    changed = [k for k in floats if not torch.equal(state[k], initial[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("decoder") for k in changed)


def _inputs(B=2, C=3, D=16, h=8, w=8, device="cpu"):
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, C + 1, (B, h, w), generator=g)
    label[:, :2] = 255  # ignored rows, as the token labels have
    label[:, 2:5, 2:5] = 255  # an uncertain blob inside the UNE region
    bf16 = dict(dtype=torch.bfloat16, device=device)
    return dict(tokens=torch.randn(B, C, D, generator=g).to(**bf16).requires_grad_(),
                feats=torch.randn(B, D, h, w, generator=g).to(**bf16).requires_grad_(),
                logits=torch.randn(B, C + 1, h, w, generator=g).to(**bf16).requires_grad_(),
                label=label.to(device), seg_label=label.where(label != 255, 0).clamp(max=C).to(device),
                y=torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], device=device))


LOSSES = {
    "cls": lambda x: classification_loss(x["tokens"][:, :, 0], x["y"]),
    "seg": lambda x: seg_loss(x["logits"], x["seg_label"]),
    "tok": lambda x: token_regularization_loss(x["tokens"], temp=1.0),  # O(1) loss: rounding shows
    "cle": lambda x: cle_loss(x["tokens"], x["feats"], x["label"], x["y"]),
    "une": lambda x: une_loss(x["tokens"], x["feats"], x["label"], x["y"], generator=torch.Generator().manual_seed(1)),
    "ptc": lambda x: masked_cosine_affinity_loss(x["feats"], x["label"], impl="reference"),
    "ptc_triton": lambda x: masked_cosine_affinity_loss(x["feats"], x["label"], impl="triton"),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_compute_in_fp32_under_autocast(name):
    if name == "ptc_triton" and not torch.cuda.is_available():
        from wsss.kernels import HAS_TRITON
        from wsss.kernels._common import interpreting

        if not (HAS_TRITON and interpreting()):
            pytest.fail("the Triton ptc loss needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it) and triton")
    # the Triton kernel runs on CUDA tensors, or on CPU tensors under the interpreter
    device = DEVICE if name == "ptc_triton" else "cpu"
    x = _inputs(device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = LOSSES[name](x)
    assert loss.dtype == torch.float32
    # The same bf16 inputs without autocast: equal up to fp32 summation order, so every matmul
    # and reduction above ran in fp32 (a bf16 matmul would be off by ~1e-2 relative).
    plain = LOSSES[name](x)
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    loss.backward()
    used = [t for t in (x["tokens"], x["feats"], x["logits"]) if t.grad is not None]
    assert used and all(t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad.float()).all() for t in used)


def test_compile_switch_parses_and_keeps_state_dict_keys():
    from wsss.models import build_model

    assert load_config(None, []).compile is False
    cfg = load_config(None, TINY + ["compile=true", "model.num_reg_tokens=2"])
    assert cfg.compile is True
    with pytest.raises(ConfigError, match="compile: expected true/false"):
        load_config(None, ["compile=3"])
    # The loop compiles in place (nn.Module.compile), so checkpoints keep their keys. A compiled
    # CPU training run takes over a minute to warm up here, so the forward itself is not run.
    model = build_model(cfg.model, 3)
    keys = list(model.state_dict())
    model.backbone.compile()
    assert list(model.state_dict()) == keys


def test_tf32_switch_parses_and_sets_cuda_precision():
    from wsss.utils.device import configure_precision

    assert load_config(None, []).tf32 is True  # TF32 on CUDA by default
    assert load_config(None, ["tf32=false"]).tf32 is False
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    configure_precision(torch.device("cpu"), True)  # nothing changes off CUDA
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
    if not torch.cuda.is_available():
        return
    try:
        configure_precision(torch.device("cuda"), True)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        configure_precision(torch.device("cuda"), False)
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
