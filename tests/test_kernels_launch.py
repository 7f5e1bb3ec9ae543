"""How wsss.kernels launches its Triton kernels: all through ``_common.launch``, under the device
guard of their tensors (so ``cuda:1`` tensors work in a process whose current device is 0), with
configurations that are pure functions of (shape, dtype, device type)."""
import ast
import contextlib
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from wsss.kernels import _common, affinity, attention, par

needs_triton = pytest.mark.needs_triton  # without triton the test fails (tests/conftest.py), never skips
KERNEL_DIR = Path(affinity.__file__).parent
MODULES = (affinity, attention, par)


def _kernel_names(module):
    return sorted(name for name in vars(module) if name.startswith("_") and name.endswith("_kernel"))


def test_every_launch_goes_through_the_guarded_launcher():
    # a `kernel[grid](...)` call anywhere but in _common.launch would skip the device guard
    offenders = []
    for path in sorted(KERNEL_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                    target = node.func.value
                    name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
                    if name.endswith("kernel") and (path.name, fn.name) != ("_common.py", "launch"):
                        offenders.append(f"{path.name}:{node.lineno} in {fn.name}")
    assert not offenders, f"kernels launched outside _common.launch: {offenders}"


def test_device_guard_targets_the_tensors_device():
    guard = _common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # entering it needs a GPU
    assert isinstance(_common.device_guard(torch.device("cpu")), contextlib.nullcontext)


def _fake_launch_all(device):
    """Every launcher once, on fake tensors of ``device`` (no memory, no GPU needed)."""
    t = lambda *shape, dtype=torch.float32: torch.rand(*shape, device=device).to(dtype)  # noqa: E731
    labels = torch.randint(0, 3, (2, 3, 4), device=device)
    logits = t(2, 12, 12)
    loss, counts = affinity._sigmoid_loss_forward(logits, labels, 255, False)
    affinity._sigmoid_loss_backward(torch.ones((), device=device), counts, logits, labels, 255, False)
    for mode in (affinity.MODE_COSINE, affinity.MODE_SIGMOID):
        x = t(2, 12, 8)
        y = x if mode == affinity.MODE_COSINE else t(2, 12, 8)
        loss, counts, scores = affinity._dot_loss_forward(x, y, labels, mode, 255, True, 1.0, True, torch.bfloat16)
        affinity._dot_loss_backward(torch.ones((), device=device), counts, scores, x, y, labels, mode, 255, True,
                                    1.0, torch.bfloat16)
    x = t(2, 2, 3, 9, 9)
    coef = t(2)
    attention._aggregate_forward(x, coef)
    attention._aggregate_backward_launch(t(2, 9, 9), x, coef)
    attention._launch_propagate(t(2, 4, 2, 3), x, None, None, coef, 3, 1.0)
    q = t(2, 2, 3, 9, 8, dtype=torch.float16)
    attention._launch_propagate(t(2, 4, 2, 3), None, q, q, coef, 3, 0.35)
    par._par_refine_triton(t(2, 3, 8, 6), t(2, 5, 4, 3), [1, 2], 2, 0.3, 0.01)


def test_every_kernel_launches_under_its_tensors_device(monkeypatch):
    # a mocked guard records the device it makes current; mocked kernels record the guard they run
    # under and the devices of their tensors; the launchers run on fake cuda:1 tensors
    current = []

    @contextlib.contextmanager
    def guard(device):
        current.append(device)
        yield
        current.pop()

    launched = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def run(*args, **meta):
                launched.append((self.name, list(current), {a.device for a in args if torch.is_tensor(a)}))
            return run

    monkeypatch.setattr(_common, "device_guard", guard)
    expected = set()
    for module in MODULES:
        for name in _kernel_names(module):
            monkeypatch.setattr(module, name, Kernel(name))
            expected.add(name)
    cuda1 = torch.device("cuda", 1)
    with FakeTensorMode():
        _fake_launch_all(cuda1)
    assert {name for name, _, _ in launched} == expected
    for name, guards, devices in launched:
        assert guards == [cuda1], f"{name} launched under {guards}"
        assert devices == {cuda1}, f"{name} got tensors on {devices}"


def test_recording_collects_cuda_configurations_without_launching():
    with _common.recording() as launches:
        _fake_launch_all(torch.device("meta"))
    names = {item.kernel.fn.__name__ if hasattr(item.kernel, "fn") else item.kernel.__name__ for item in launches}
    assert names == {name for module in MODULES for name in _kernel_names(module)}
    assert all("num_warps" in item.meta for item in launches)  # chosen as on CUDA
    assert all(item.device.type == "meta" for item in launches)


@needs_triton
@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_configs_are_pure_functions_of_shape_dtype_and_device_type(device_type):
    calls = [
        lambda: affinity._logit_config(576, torch.float32, device_type),
        lambda: affinity._dot_fwd_config(784, 768, torch.bfloat16, device_type),
        lambda: affinity._dot_bwd_config(576, 384, torch.float16, device_type),
        lambda: attention._row_config(804, torch.float32, device_type),
        lambda: attention._tile_config(804, torch.float32, device_type),
        lambda: attention._propagate_config(12, 6, 2, 1712, 20, 20, 64, torch.float32, device_type, True),
        lambda: par._kappa_config(224 * 224, device_type),
        lambda: par._par_propagate_config(42, 224 * 224, device_type),
    ]
    for call in calls:
        cfg = call()
        assert cfg == call()
        assert all(isinstance(v, (int, str, bool)) or "dtype" in type(v).__name__ for v in cfg.values())
        assert ("num_warps" in cfg) == (device_type == "cuda")


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@needs_triton
def test_dot_precision_follows_dtype_device_and_torch(matmul_precision):
    tl = _common.tl
    matmul_precision("high")  # what wsss's tf32 config sets on CUDA
    assert _common.dot_config(torch.float32, "cuda") == dict(DOT_TY=tl.float32, DOT_PREC="tf32")
    assert _common.dot_config(torch.bfloat16, "cuda") == dict(DOT_TY=tl.bfloat16, DOT_PREC="ieee")
    assert _common.dot_config(torch.float16, "cuda") == dict(DOT_TY=tl.float16, DOT_PREC="ieee")
    assert _common.dot_config(torch.float64, "cuda") == dict(DOT_TY=tl.float64, DOT_PREC="ieee")
    # the interpreter computes raw half values wrongly: fp32 operands there
    assert _common.dot_config(torch.bfloat16, "cpu") == dict(DOT_TY=tl.float32, DOT_PREC="ieee")
    matmul_precision("highest")  # torch's default: IEEE fp32 products
    assert _common.dot_config(torch.float32, "cuda")["DOT_PREC"] == "ieee"
    # dL/ds underflows fp16: the backward of fp16 inputs multiplies in (TF32) fp32
    assert affinity._dot_bwd_config(784, 768, torch.float16, "cuda")["DOT_TY"] == tl.float32


def test_interpreter_and_recording_choose_the_device_type(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _common.launch_device_type(cpu) == "cpu"
    with _common.recording():
        assert _common.launch_device_type(cpu) == "cuda"


@needs_triton
@pytest.mark.parametrize("L,Hd,B,N,C", [(12, 6, 2, 1692, 20), (1, 6, 4, 196, 20), (12, 6, 4, 784, 80),
                                        (4, 12, 1, 16, 3)])
def test_propagate_splits_whole_heads_and_fill_the_gpu(L, Hd, B, N, C):
    cfg = attention._propagate_config(L, Hd, B, C + N, C, C, 64, torch.bfloat16, "cuda", True)
    per = cfg["heads_per_program"]
    assert (L * Hd) % per == 0
    programs = B * -(-N // cfg["BLOCK_R"]) * -(-C // cfg["BLOCK_CLS"]) * (L * Hd // per)
    assert programs >= min(attention.PROPAGATE_MIN_PROGRAMS, B * -(-N // cfg["BLOCK_R"]) * -(-C // 32) * L * Hd)
