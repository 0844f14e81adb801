"""Every ``--arch``: BackdoorBench's key names, torchvision's structure, a defense step.

Key names are written out from BackdoorBench's ``models/preact_resnet.py`` and from the
torchvision modules its ``generate_cls_model`` builds (``utils/aggregate_block/
model_trainer_generate.py``); each torchvision model is also checked against the builder call
BackdoorBench makes (structure, keys both ways, outputs). The builder's copy is made on the meta
device and takes our tensors (``assign=True``), so checking costs no second initialization.
One model per arch is built for the whole module (the largest take seconds to initialize).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchvision import models as tvm
from torchvision.transforms import Resize

from defenses import get_defense, make_config
from zoo.data import DataError, DatasetInfo, Split, dataset_info
from zoo.models import ARCHS, Classifier, build_model

K = 3  # classes
INFO = DatasetInfo("tiny-rgb", 3, 32, K, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), hflip=True, pad=4)
CPU = torch.device("cpu")

# Where BackdoorBench's model keeps its final Linear, and a few characteristic keys of each.
HEAD_NAME = {
    "cnn": "head",
    "preact-resnet18": "linear",
    "preactresnet18": "linear",
    "resnet18": "fc",
    "vgg19_bn": "classifier.6",
    "mobilenet_v3_large": "classifier.3",
    "efficientnet_b3": "classifier.1",
    "convnext_tiny": "classifier.2",
    "vit_b_16": "1.heads.head",
}
SOME_KEYS = {
    "resnet18": ["conv1.weight", "bn1.running_var", "layer1.0.conv1.weight",
                 "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean",
                 "layer4.1.bn2.weight"],
    # cfg "E": 16 conv-BN-ReLU and 5 max-pools in ``features``; the last conv is features.49.
    "vgg19_bn": ["features.0.weight", "features.1.running_mean", "features.49.weight",
                 "features.50.num_batches_tracked", "classifier.0.weight", "classifier.3.bias"],
    # stem features.0, 15 inverted residuals features.1-15 (the first SE in features.4), 1x1 conv.
    "mobilenet_v3_large": ["features.0.0.weight", "features.0.1.running_mean",
                           "features.4.block.2.fc1.weight", "features.15.block.3.1.weight",
                           "features.16.0.weight", "classifier.0.weight"],
    # stem, 7 stages (depth x1.4: 2, 3, 3, 4, 4, 6, 2 blocks), then the 1x1 conv features.8.
    "efficientnet_b3": ["features.0.0.weight", "features.1.1.block.1.fc1.weight",
                        "features.6.5.block.3.1.running_var", "features.7.1.block.0.0.weight",
                        "features.8.0.weight", "features.8.1.bias"],
    # stem, stage, downsample, stage, ... ; CNBlock = dwconv, permute, LN, Linear, GELU, Linear.
    "convnext_tiny": ["features.0.0.weight", "features.0.1.weight", "features.1.0.layer_scale",
                      "features.1.2.block.0.weight", "features.2.1.weight",
                      "features.5.8.block.5.weight", "features.7.2.block.3.bias",
                      "classifier.0.weight"],
    "vit_b_16": ["1.class_token", "1.conv_proj.weight", "1.encoder.pos_embedding",
                 "1.encoder.layers.encoder_layer_0.ln_1.weight",
                 "1.encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
                 "1.encoder.layers.encoder_layer_11.mlp.3.bias", "1.encoder.ln.weight"],
}


def preactresnet18_keys() -> list[str]:
    """BackdoorBench's ``PreActResNet18().state_dict()`` keys, in order: ``conv1``; per layer two
    ``PreActBlock``s (``bn1``, ``conv1``, ``bn2``, ``conv2``, and ``shortcut.0`` where the stride
    or width changes: the first block of layers 2-4); ``linear``."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}."
            keys += [p + f"bn1.{s}" for s in bn] + [p + "conv1.weight"]
            keys += [p + f"bn2.{s}" for s in bn] + [p + "conv2.weight"]
            if layer > 1 and block == 0:
                keys.append(p + "shortcut.0.weight")
    return keys + ["linear.weight", "linear.bias"]


def backdoorbench_builder(arch: str) -> Callable[[], nn.Module]:
    """BackdoorBench's ``generate_cls_model(arch, K)`` for the torchvision archs, weights aside."""
    def vit() -> nn.Module:
        net = tvm.vit_b_16()
        net.heads.head = nn.Linear(net.heads.head.in_features, out_features=K, bias=True)
        return nn.Sequential(Resize((224, 224)), net)

    return {
        "resnet18": lambda: tvm.resnet18(num_classes=K),
        "vgg19_bn": lambda: tvm.vgg19_bn(num_classes=K),
        "mobilenet_v3_large": lambda: tvm.mobilenet_v3_large(num_classes=K),
        "efficientnet_b3": lambda: tvm.efficientnet_b3(num_classes=K),
        "convnext_tiny": lambda: tvm.convnext_tiny(num_classes=K),
        "vit_b_16": vit,
    }[arch]


TORCHVISION_ARCHS = list(SOME_KEYS)


@pytest.fixture(scope="module")
def built() -> Callable[[str], Classifier]:
    """``get(arch)``: one model per arch for the module, built on first use."""
    cache: dict[str, Classifier] = {}

    def get(arch: str) -> Classifier:
        if arch not in cache:
            torch.manual_seed(0)
            cache[arch] = build_model(arch, INFO)
        return cache[arch]

    return get


def images(n: int, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, INFO.size, INFO.size), dtype=torch.uint8, generator=gen)
    return Split(x, torch.arange(n) % K)


def head_name(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if m is model.head]


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


def test_archs_lists_backdoorbench_cifar_models_and_both_preact_spellings():
    for arch in ("cnn", "preact-resnet18", "preactresnet18", "resnet18", "vgg19_bn",
                 "mobilenet_v3_large", "efficientnet_b3", "convnext_tiny", "vit_b_16"):
        assert arch in ARCHS
    assert set(ARCHS) == set(HEAD_NAME)


def test_unknown_arch_names_it_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'vgg19': expected one of .*vit_b_16"):
        build_model("vgg19", INFO)


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_archs_refuse_one_channel_datasets(arch):
    with pytest.raises(DataError, match=f"arch '{arch}' takes RGB.*dataset 'mnist' has 1 channel"):
        build_model(arch, dataset_info("mnist"))


@pytest.mark.parametrize("arch", ["vgg19_bn", "convnext_tiny"])
def test_archs_with_five_downsamplings_refuse_images_under_32_pixels(arch):
    small = DatasetInfo("small", 3, 16, K, INFO.mean, INFO.std, hflip=False, pad=2)
    with pytest.raises(DataError, match=f"'{arch}' needs images of at least 32 x 32.*16 x 16"):
        build_model(arch, small)


def test_preact_and_cnn_still_take_one_channel_images():
    info = dataset_info("mnist")
    for arch in ("cnn", "preactresnet18"):
        out = build_model(arch, info).eval()(torch.zeros(2, 1, 28, 28))
        assert out.shape == (2, 10)


def test_torchvision_archs_without_torchvision_say_so(monkeypatch):
    import zoo.models as zm

    monkeypatch.setattr(zm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="'resnet18' needs torchvision .not installed."):
        build_model("resnet18", INFO)


def test_importing_the_zoo_does_not_import_torchvision():
    code = "import sys, zoo.models, zoo.victims; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Key names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["preact-resnet18", "preactresnet18"])
def test_preactresnet18_keys_are_backdoorbench_s_exactly(arch, built):
    assert list(built(arch).state_dict()) == preactresnet18_keys()


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_arch_has_backdoorbench_s_characteristic_keys(arch, built):
    keys = set(built(arch).state_dict())
    missing = [k for k in SOME_KEYS[arch] if k not in keys]
    assert not missing
    assert f"{HEAD_NAME[arch]}.weight" in keys and f"{HEAD_NAME[arch]}.bias" in keys


@pytest.mark.parametrize("arch", ARCHS)
def test_head_is_registered_once_under_backdoorbench_s_name(arch, built):
    model = built(arch)
    assert head_name(model) == [HEAD_NAME[arch]]
    if arch != "cnn":  # our own model keeps its own name
        assert not any(k.startswith("head.") for k in model.state_dict())


def test_a_backdoorbench_preactresnet18_state_dict_loads_strictly(built):
    model = built("preactresnet18")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    theirs = {k: torch.randn(shapes[k], generator=gen) for k in preactresnet18_keys()}
    for k in theirs:
        if k.endswith("num_batches_tracked"):
            theirs[k] = torch.tensor(7)
    fresh = build_model("preactresnet18", INFO)
    fresh.load_state_dict(theirs, strict=True)
    assert torch.equal(fresh.head.weight, theirs["linear.weight"])
    with pytest.raises(RuntimeError, match="head.weight"):  # the layout stored before format 3
        fresh.load_state_dict({("head" + k[6:] if k.startswith("linear") else k): v
                               for k, v in theirs.items()}, strict=True)


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_arch_is_backdoorbench_s_builder_call(arch, built):
    """Same modules (repr: widths, eps, dropout, stochastic depth), keys both ways, outputs."""
    ours = built(arch).eval()
    with torch.device("meta"):
        ref = backdoorbench_builder(arch)()
        empty = build_model(arch, INFO)
    assert [(n, repr(m)) for n, m in ours.named_children()] == \
           [(n, repr(m)) for n, m in ref.named_children()]
    empty.load_state_dict(ref.state_dict(), strict=True, assign=True)  # theirs -> ours
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)  # ours -> theirs
    ref.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


# ---------------------------------------------------------------------------------------------
# features / head, and one defense step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_is_head_of_features(arch, built):
    model = built(arch).eval()
    head = model.head
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = head.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    x = torch.randn(2, 3, 32, 32)
    try:
        with torch.no_grad():
            feats, out = model.features(x), model(x)
    finally:
        hook.remove()
    assert isinstance(head, nn.Linear) and head.out_features == K
    assert feats.shape == (2, head.in_features)
    # model(x) ran through this very Linear, on features(x), and returned its output.
    assert len(seen) == 1 and seen[0][1] is out
    torch.testing.assert_close(seen[0][0], feats)


@pytest.mark.parametrize("arch", ARCHS)
def test_last_block_holds_parameters_outside_the_head(arch, built):
    model = built(arch)
    block = {id(p) for p in model.last_block.parameters()}
    assert block and block <= {id(p) for p in model.parameters()}
    assert not block & {id(p) for p in model.head.parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_one_fst_epoch_trains_the_model_in_place(arch, built):
    model = built(arch)
    keys = list(model.state_dict())
    head_before = model.head.weight.detach().clone()
    block_before = [p.detach().clone() for p in model.last_block.parameters()]
    cfg = make_config("fst", {"epochs": 1, "batch_size": 2})  # one step of 2 images
    results = list(get_defense("fst").run(model, images(2, 0), INFO, cfg, seed=0, device=CPU))
    assert len(results) == 1 and not results[0].diverged and math.isfinite(results[0].loss)
    assert not torch.equal(model.head.weight.detach(), head_before)
    assert any(not torch.equal(p.detach(), b)
               for p, b in zip(model.last_block.parameters(), block_before))
    assert list(model.state_dict()) == keys
