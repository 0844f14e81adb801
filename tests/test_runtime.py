"""Device, precision and memory-layout choices (zoo.runtime), checked on CPU."""

from __future__ import annotations

import pytest
import torch

from zoo import runtime
from zoo.data import DatasetInfo
from zoo.models import build_model
from zoo.victims import ZooSpec

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert runtime.use_bf16(CPU, "auto") is native
    assert runtime.use_bf16(CPU, "fp32") is False and runtime.use_bf16(CPU, "bf16") is True


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True),
                                                   ((8, 6), True), ((9, 0), True)])
def test_auto_precision_is_bf16_only_on_a_gpu_with_native_bf16(monkeypatch, capability, native) -> None:
    """V100 (7.0) and T4 (7.5) emulate bf16 (``is_bf16_supported()`` says yes there): fp32;
    Ampere (8.x) and Hopper (9.0) compute it natively: bf16. Device properties faked."""
    seen = []

    def props(device=None):
        seen.append(device)
        return type("Props", (), {"major": capability[0], "minor": capability[1]})()

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    cuda1 = torch.device("cuda", 1)
    assert runtime.use_bf16(cuda1, "auto") is native
    assert seen and torch.device(seen[-1]) == cuda1  # the trial's own GPU, not GPU 0
    assert runtime.use_bf16(cuda1, "fp32") is False and runtime.use_bf16(cuda1, "bf16") is True


def test_unknown_precision_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"precision 'fp16': expected one of auto, fp32, bf16"):
        runtime.use_bf16(CPU, "fp16")


def test_autocast_runs_convolutions_in_bf16_when_asked() -> None:
    conv = torch.nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 5, 5)
    with runtime.autocast(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with runtime.autocast(CPU, "fp32"):
        assert conv(x).dtype == torch.float32


def test_models_and_batches_are_channels_last_with_the_same_outputs() -> None:
    info = DatasetInfo("toy", 3, 32, 10, (0.5,) * 3, (0.5,) * 3, hflip=True, pad=4)
    torch.manual_seed(0)
    model = build_model("cnn", info).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        fast = runtime.prepare_model(model, CPU)
        xb = runtime.to_device_layout(x)
        assert xb.is_contiguous(memory_format=torch.channels_last)
        assert fast.body[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(fast(xb), before, rtol=1e-4, atol=1e-5)


def test_victims_train_in_fp32_on_cpu_unless_asked() -> None:
    assert ZooSpec("digits").victim_precision(CPU) == "fp32"
    assert ZooSpec("digits", precision="bf16").victim_precision(CPU) == "bf16"
    assert ZooSpec("digits").victim_precision(torch.device("cuda")) == "auto"
    assert ZooSpec("digits", precision="bf16") == ZooSpec("digits")  # not part of the victim's identity


def test_cnn_pools_after_its_first_convolution_only_above_16_pixels() -> None:
    def pools(size: int) -> int:
        info = DatasetInfo("toy", 1, size, 10, (0.5,), (0.5,), hflip=False, pad=2)
        body = build_model("cnn", info).body
        return sum(isinstance(m, torch.nn.MaxPool2d) for m in body.modules())

    assert pools(16) == 2 and pools(28) == 3 and pools(32) == 3


@pytest.mark.parametrize("size", [16, 32])
def test_cnn_pool_then_relu_equals_the_plain_conv_bn_relu_pool_network(size: int) -> None:
    """The cnn moves each ReLU that a max-pool follows after the pool: the same outputs and
    the same parameter gradients as the textbook layout, under the same parameter names."""
    from torch import nn

    info = DatasetInfo("toy", 3, size, 10, (0.5,) * 3, (0.5,) * 3, hflip=False, pad=2)
    torch.manual_seed(0)
    fast = build_model("cnn", info)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU())

    stem = [nn.MaxPool2d(2)] if size > 16 else []
    plain_body = nn.Sequential(block(3, 32), *stem, block(32, 32), nn.MaxPool2d(2), block(32, 64),
                               block(64, 64), nn.MaxPool2d(2), block(64, 128),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten())
    plain = nn.Sequential()
    plain.body, plain.head = plain_body, nn.Linear(128, 10)
    plain.load_state_dict(fast.state_dict())  # strict: the names match
    x = torch.randn(8, 3, size, size)
    y = torch.randint(0, 10, (8,))
    for model in (fast, plain):
        nn.functional.cross_entropy(model.head(model.body(x)), y).backward()
    torch.testing.assert_close(fast(x), plain.head(plain.body(x)))
    for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_evaluation_by_the_device_batch_counts_every_image_once() -> None:
    from zoo.data import Split
    from zoo.metrics import evaluate

    info = DatasetInfo("toy", 1, 8, 10, (0.5,), (0.5,), hflip=False, pad=0)
    torch.manual_seed(0)
    model = build_model("cnn", info)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)

    clean = Split(images(300), torch.randint(0, 10, (300,)))
    bd = Split(images(170), torch.randint(1, 10, (170,)))
    # 128 on CPU: 3 and 2 batches, the last ones partial
    by_device = evaluate(model, clean, bd, 0, info, device=CPU, precision="fp32")
    one_batch = evaluate(model, clean, bd, 0, info, device=CPU, precision="fp32", batch_size=1024)
    assert by_device == one_batch
