"""Tests of the model registry: one contract over every model, then per-model structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from trainables.errors import SpecError
from trainables.models import (
    MODELS,
    available_models,
    build_model,
    count_parameters,
    is_convolutional,
)
from trainables.models.vgg import VGG13_LAYERS

NUM_CLASSES = 10


def input_shape_for(name: str) -> tuple[int, int, int]:
    # Convolutional models take 3x32x32 images, and the MLP takes native MNIST-sized images.
    return (3, 32, 32) if is_convolutional(name) else (1, 28, 28)


@pytest.fixture(scope="module", params=available_models())
def built(request: pytest.FixtureRequest) -> tuple[str, nn.Module, tuple[int, int, int]]:
    torch.manual_seed(0)
    name = request.param
    shape = input_shape_for(name)
    return name, build_model(name, NUM_CLASSES, shape), shape


# Contract shared by every registered model


def test_registry_contains_paper_models() -> None:
    assert {"resnet18", "vgg13", "mlp"} <= set(available_models())


def test_contract_output_and_feature_shapes(built) -> None:
    name, model, shape = built
    model.eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        logits = model(x)
        logits_again, features = model(x, return_features=True)
    assert logits.shape == (2, NUM_CLASSES)
    assert features.shape == (2, model.feature_dim)
    assert torch.equal(logits, logits_again)
    assert torch.allclose(model.classifier(features), logits, atol=1e-6)


def test_contract_backward_reaches_every_parameter(built) -> None:
    name, model, shape = built
    model.train()
    model.zero_grad(set_to_none=True)
    x = torch.randn(2, *shape)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_contract_eval_mode_is_deterministic(built) -> None:
    name, model, shape = built
    model.eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        first = model(x)
        second = model(x)
    assert torch.equal(first, second)


def test_contract_eval_mode_accepts_one_sample(built) -> None:
    name, model, shape = built
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, *shape))
    assert logits.shape == (1, NUM_CLASSES)


def test_contract_parameter_count_in_range(built) -> None:
    name, model, shape = built
    assert 1_000_000 < count_parameters(model) < 100_000_000


@pytest.mark.parametrize("name", [n for n in available_models() if is_convolutional(n)])
def test_contract_channels_last_matches_contiguous(name: str) -> None:
    torch.manual_seed(0)
    shape = input_shape_for(name)
    model = build_model(name, NUM_CLASSES, shape).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        actual = model(x.to(memory_format=torch.channels_last))
    assert torch.allclose(actual, expected, atol=1e-4, rtol=1e-4)


def test_contract_options_match_builder_signature() -> None:
    assert MODELS["mlp"].options == ("depth", "width", "batch_norm", "penultimate_width")
    assert MODELS["resnet18"].options == ()
    assert MODELS["vgg13"].options == ()


# ResNet-18


def test_resnet18_parameter_count() -> None:
    # 11,173,962 is the widely reported size of CIFAR ResNet-18 with 10 classes.
    assert count_parameters(build_model("resnet18", 10, (3, 32, 32))) == 11_173_962


def test_resnet18_has_cifar_stem() -> None:
    model = build_model("resnet18", 10, (3, 32, 32))
    first = model.stem[0]
    assert first.kernel_size == (3, 3)
    assert first.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.feature_dim == 512


def test_resnet18_last_stage_is_4x4_for_32x32() -> None:
    model = build_model("resnet18", 10, (3, 32, 32)).eval()
    with torch.no_grad():
        out = model.stages(model.stem(torch.randn(1, 3, 32, 32)))
    assert out.shape == (1, 512, 4, 4)


def test_resnet18_one_channel_input() -> None:
    model = build_model("resnet18", 10, (1, 28, 28)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# VGG-13


def test_vgg13_parameter_count() -> None:
    # Bias-free 3x3 convolutions, two batch-norm parameters per channel, linear head.
    expected = 0
    channels = 3
    for layer in VGG13_LAYERS:
        if layer == "M":
            continue
        expected += 9 * channels * layer + 2 * layer
        channels = layer
    expected += 512 * 10 + 10
    assert expected == 9_413_066
    assert count_parameters(build_model("vgg13", 10, (3, 32, 32))) == expected


def test_vgg13_layers() -> None:
    model = build_model("vgg13", 10, (3, 32, 32))
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convolutions) == 10
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 10
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == 512


def test_vgg13_conv_stack_ends_at_1x1() -> None:
    model = build_model("vgg13", 10, (3, 32, 32)).eval()
    with torch.no_grad():
        assert model.convolutions(torch.randn(1, 3, 32, 32)).shape == (1, 512, 1, 1)


def test_vgg13_rejects_small_input() -> None:
    with pytest.raises(SpecError, match=r"\(3, 28, 28\).*at least 32"):
        build_model("vgg13", 10, (3, 28, 28))


# MLP


def test_mlp_default_layers() -> None:
    model = build_model("mlp", 10, (1, 28, 28))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 10  # 9 hidden layers and the classifier
    assert linears[0].in_features == 28 * 28
    assert all(layer.out_features == 2048 for layer in linears[:-1])
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 9
    assert model.feature_dim == 2048


def test_mlp_penultimate_width_sets_features() -> None:
    model = build_model("mlp", 10, (1, 28, 28), depth=3, width=64, penultimate_width=10).eval()
    widths = [m.out_features for m in model.hidden if isinstance(m, nn.Linear)]
    assert widths == [64, 64, 10]
    with torch.no_grad():
        _, features = model(torch.randn(4, 1, 28, 28), return_features=True)
    assert features.shape == (4, 10)
    assert (features >= 0).all()  # the features are ReLU outputs


def test_mlp_depth_one_uses_penultimate_width() -> None:
    model = build_model("mlp", 10, (1, 28, 28), depth=1, width=64, penultimate_width=16)
    assert [m.out_features for m in model.hidden if isinstance(m, nn.Linear)] == [16]


def test_mlp_without_batch_norm() -> None:
    model = build_model("mlp", 10, (3, 32, 32), depth=2, width=32, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Linear))
    model.train()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_mlp_flattens_channels_last_input() -> None:
    model = build_model("mlp", 10, (3, 32, 32), depth=2, width=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        actual = model(x.to(memory_format=torch.channels_last))
    assert torch.allclose(actual, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("depth", 0),
        ("depth", True),
        ("depth", 2.5),
        ("width", -1),
        ("width", "wide"),
        ("penultimate_width", 0),
        ("batch_norm", "yes"),
    ],
)
def test_mlp_rejects_invalid_option(option: str, value: object) -> None:
    with pytest.raises(SpecError, match=f"invalid {option} {value!r}"):
        build_model("mlp", 10, (1, 28, 28), **{option: value})


# build_model and is_convolutional


def test_build_model_unknown_name_lists_models() -> None:
    with pytest.raises(SpecError) as caught:
        build_model("resnet50", 10, (3, 32, 32))
    message = str(caught.value)
    assert "'resnet50'" in message
    for name in available_models():
        assert name in message


def test_build_model_unknown_option_named() -> None:
    with pytest.raises(SpecError, match=r"unknown option 'dropout' for model 'mlp'.*depth, width"):
        build_model("mlp", 10, (1, 28, 28), dropout=0.5)


def test_build_model_option_for_optionless_model() -> None:
    with pytest.raises(SpecError, match=r"unknown option 'depth' for model 'resnet18'.*none"):
        build_model("resnet18", 10, (3, 32, 32), depth=9)


@pytest.mark.parametrize("num_classes", [1, 0, 2.0, True])
def test_build_model_rejects_num_classes(num_classes: object) -> None:
    with pytest.raises(SpecError, match=f"invalid num_classes {num_classes!r}"):
        build_model("mlp", num_classes, (1, 28, 28), depth=1, width=8)


@pytest.mark.parametrize("shape", [(32, 32), (3, 0, 32), (3, 32.0, 32), "3x32x32"])
def test_build_model_rejects_input_shape(shape: object) -> None:
    with pytest.raises(SpecError, match="invalid input_shape"):
        build_model("resnet18", 10, shape)


def test_is_convolutional() -> None:
    assert is_convolutional("resnet18")
    assert is_convolutional("vgg13")
    assert not is_convolutional("mlp")


def test_is_convolutional_unknown_name() -> None:
    with pytest.raises(SpecError, match="unknown model 'lenet'"):
        is_convolutional("lenet")
