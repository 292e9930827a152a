import pytest
import torch

from gigaslide import devices
from gigaslide.devices import PRECISIONS, autocast_ctx, autocast_dtype, pick_device, resolve_precision
from gigaslide.errors import GigaslideError

CPU = torch.device("cpu")


def test_auto_is_fp32_on_cpu_and_explicit_names_pass_through():
    assert resolve_precision(CPU, "auto") == "fp32"
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(CPU, p) == p
    assert autocast_dtype(CPU, "auto") is None
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16


def test_autocast_ctx_changes_matmul_dtype_only_when_asked():
    a = torch.randn(4, 4)
    with autocast_ctx(CPU, "auto"):
        assert (a @ a).dtype == torch.float32
    with autocast_ctx(CPU, "bf16"):
        assert (a @ a).dtype == torch.bfloat16


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(GigaslideError, match="unknown precision 'fp8'") as e:
        resolve_precision(CPU, "fp8")
    assert all(p in e.value.one_line() for p in PRECISIONS)


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_device_this_machine_lacks_is_a_one_line_error(monkeypatch):
    import pytest

    from gigaslide.errors import GigaslideError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GigaslideError, match="no CUDA device"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(GigaslideError, match="has 2 CUDA device"):
        pick_device("cuda:2")


def test_auto_on_cpu_uses_bf16_only_when_the_probe_agrees_with_fp32(monkeypatch):
    from gigaslide import devices
    from gigaslide.devices import BF16_MIN_COSINE, choose_precision

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    good = choose_precision(CPU, "auto", probe=lambda: lin(x))
    assert good.resolved == "bf16" and good.bf16_cosine >= BF16_MIN_COSINE
    # outputs that cancel almost exactly: bf16 rounding destroys them, so auto must stay fp32
    big = torch.full((8, 64), 1001.0)  # not representable in bf16 (8-bit mantissa)
    bad = choose_precision(CPU, "auto", probe=lambda: (big @ torch.eye(64) - big + x * 1e-3))
    assert bad.resolved == "fp32" and bad.bf16_cosine < BF16_MIN_COSINE
    assert choose_precision(CPU, "auto").resolved == "fp32"  # no probe: nothing checked, fp32
    assert choose_precision(CPU, "bf16").record() == {"requested": "bf16", "resolved": "bf16"}


def test_a_training_loop_measured_in_bf16_gets_it_on_a_cpu_with_native_bf16_only(monkeypatch):
    from gigaslide import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    got = devices.choose_precision(cpu, "auto", bf16_measured="bench X")
    assert (got.resolved, got.record()) == ("bf16", {"requested": "auto", "resolved": "bf16", "basis": "bench X"})
    assert devices.choose_precision(cpu, "auto").resolved == "fp32"  # nothing measured: fp32
    assert devices.choose_precision(cpu, "fp32", bf16_measured="bench X").resolved == "fp32"  # the user's word wins
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)  # emulated bf16 is slower than fp32
    assert devices.choose_precision(cpu, "auto", bf16_measured="bench X").resolved == "fp32"


def test_auto_on_a_cpu_without_native_bf16_runs_fp32_even_where_bf16_would_be_accurate(monkeypatch):
    """Emulated bf16 autocast is several times slower than fp32 (AVX2-only CPUs): ``auto`` must not pick it,
    and says why in the record."""
    from gigaslide import devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    got = devices.choose_precision(CPU, "auto", probe=lambda: lin(x))
    assert got.record() == {"requested": "auto", "resolved": "fp32", "basis": devices.NO_NATIVE_BF16}
    assert devices.choose_precision(CPU, "bf16").resolved == "bf16"  # asked for by name: the user's word wins


def test_native_bf16_detection_matches_the_cpu_flags():
    from pathlib import Path

    from gigaslide.devices import cpu_has_native_bf16

    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set(info.read_text().split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def test_loader_workers_leave_the_model_its_cores():
    from gigaslide.devices import loader_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader_workers(cpu, cores=2, torch_threads=2) == 0  # the model uses every core: load in the main process
    assert loader_workers(cpu, cores=8, torch_threads=2) == 4  # spare cores, at most `cpu_most`
    assert loader_workers(cpu, cores=3, torch_threads=2) == 1
    assert loader_workers(cuda, cores=16) == 8 and loader_workers(cuda, cores=4) == 3 and loader_workers(cuda, cores=1) == 1


def _weight_grad(conv: torch.nn.Conv2d, x: torch.Tensor, go: torch.Tensor, bf16: bool) -> torch.Tensor:
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = conv(x)
    y.backward(go.to(y.dtype))
    return conv.weight.grad.clone()


@pytest.mark.parametrize(("side", "stride"), [(1, 2), (2, 3), (1, 3)])
def test_guarded_conv_weight_gradients_in_bf16_match_fp32_where_the_stride_passes_the_input(side, stride):
    """PyTorch's CPU bf16 kernel returns garbage (up to 1e38 or NaN, varying per call) in the weight gradient
    taps that see only padding when the stride exceeds the input size; guarded, every call is right."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 16, 3, stride=stride, padding=1, bias=False)
    assert devices.guard_bf16_convs(conv) == 1 and type(conv) is devices.GuardedConv2d
    x = torch.randn(4, 32, side, side).contiguous(memory_format=torch.channels_last)
    go = torch.randn(4, 16, 1, 1)
    ref = _weight_grad(conv, x, go, bf16=False)
    assert ref[:, :, 1, 0].abs().max() == 0  # a tap that sees only padding: no gradient
    for _ in range(20):
        got = _weight_grad(conv, x, go, bf16=True)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_guard_runs_only_the_hazardous_geometry_in_fp32_and_keeps_the_state_dict():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, stride=2, padding=1))
    keys = list(model.state_dict())
    assert devices.guard_bf16_convs(model) == 2 and list(model.state_dict()) == keys
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 8, 8)).dtype == torch.bfloat16  # 8 -> 4 -> 2: no stride passes its input
        assert model[0](torch.randn(2, 3, 1, 1)).dtype == torch.float32  # stride 2 on a 1x1 map: fp32
        assert model[0](torch.randn(2, 3, 4, 1)).dtype == torch.float32  # the width alone decides too
    assert model[0](torch.randn(2, 3, 1, 1)).dtype == torch.float32  # no autocast: untouched
    assert not devices.bf16_conv_hazard(torch.randn(1, 3, 1, 1), (2, 2))  # outside autocast: no hazard


@pytest.mark.parametrize("capability,want", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_on_cuda_is_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, want):
    """On a T4 / V100 (compute capability 7.x) bf16 only runs emulated, several times slower than fp16, yet
    ``torch.cuda.is_bf16_supported()`` says True there (it counts emulation by default): ``auto`` must pick fp16 on
    such GPUs, and ask about the GPU it was given (here cuda:1), not the current one."""
    asked = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    # how torch answers on these GPUs: True when emulation counts (its default), native support only from 8.0
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))
    got = devices.choose_precision(torch.device("cuda:1"), "auto")
    assert got.resolved == want and got.requested == "auto"
    assert asked and all(torch.device(d) == torch.device("cuda:1") for d in asked)


def test_fp16_training_scales_the_loss_so_small_gradients_do_not_underflow():
    """Under fp16 autocast, gradients below fp16's range flush to zero unless the loss is scaled: the loops' scaler
    (devices.grad_scaler) is on for fp16 and gives the fp32 gradient back; for other precisions it passes through."""
    from gigaslide.devices import grad_scaler

    torch.manual_seed(0)
    m, x, cpu = torch.nn.Linear(8, 1), torch.randn(4, 8), torch.device("cpu")
    (m(x) * 1e-8).sum().backward()
    ref = m.weight.grad.clone()
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        y = m(x)
    (y.float() * 1e-8).sum().backward()
    assert not m.weight.grad.any()  # unscaled fp16: every gradient flushed to zero
    m.zero_grad()
    scaler = grad_scaler(cpu, "fp16")
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    with torch.autocast("cpu", dtype=torch.float16):
        y = m(x)
    scaler.scale((y.float() * 1e-8).sum()).backward()
    scaler.unscale_(opt)
    torch.testing.assert_close(m.weight.grad, ref, rtol=5e-3, atol=0.0)  # fp16's own rounding
    assert not any(grad_scaler(cpu, p).is_enabled() for p in ("fp32", "bf16", "auto"))
