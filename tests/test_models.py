import pytest
import torch

from splitrpc.errors import UserError
from splitrpc.models import activation_shape, build_model, count_parameters, split_model

# Parameter counts at width 1.0 as published for the CIFAR reference implementations:
# VGG with BatchNorm (14.73 M for VGG-16), ResNet-18 with a 3x3 stem (11.17 M),
# and He et al.'s CIFAR ResNets with the parameter-free shortcut (0.27 M, 0.85 M).
LITERATURE = {
    ("vgg11", 10): 9_231_114,
    ("vgg16", 10): 14_728_266,
    ("resnet18", 10): 11_173_962,
    ("resnet18", 100): 11_220_132,
    ("resnet20", 10): 269_722,
    ("resnet56", 10): 853_018,
}


@pytest.mark.parametrize("name,classes", sorted(LITERATURE))
def test_parameter_counts_match_literature(name, classes):
    assert count_parameters(build_model(name, classes)) == LITERATURE[(name, classes)]


def test_rounded_counts_as_quoted():
    assert round(count_parameters(build_model("vgg16")) / 1e6, 2) == 14.73
    assert round(count_parameters(build_model("resnet18")) / 1e6, 2) == 11.17
    assert round(count_parameters(build_model("resnet20")) / 1e6, 2) == 0.27


CUTS = {"vgg11": [1, 2, 4, 8], "vgg16": [1, 3, 13], "resnet18": [1, 2, 5, 9], "resnet20": list(range(1, 11)),
        "resnet56": [1, 10, 28]}


@pytest.mark.parametrize("name", sorted(CUTS))
@pytest.mark.parametrize("train", [False, True])
def test_cut_composition_is_exact(name, train):
    torch.manual_seed(0)
    model = build_model(name, 10, width=0.25)
    model.train(train)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for cut in CUTS[name]:
            head, trunk = split_model(model, cut)
            assert torch.equal(trunk(head(x)), expected), (name, cut)


def test_first_stage_is_conv_norm_relu():
    head, _ = split_model(build_model("resnet20"), 1)
    kinds = [type(m).__name__ for m in head.modules() if not isinstance(m, torch.nn.Sequential)]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"]
    head, _ = split_model(build_model("vgg11"), 1)
    kinds = [type(m).__name__ for m in head.modules() if not isinstance(m, torch.nn.Sequential)]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"]


def test_head_and_trunk_partition_parameters():
    model = build_model("resnet20")
    head, trunk = split_model(model, 3)
    assert count_parameters(head) + count_parameters(trunk) == count_parameters(model)


def test_width_scales_channels():
    assert activation_shape(build_model("resnet20", width=0.5), 1) == (8, 32, 32)
    assert activation_shape(build_model("vgg11", width=0.25), 1) == (16, 32, 32)
    assert activation_shape(build_model("vgg11"), 2) == (128, 16, 16)


@pytest.mark.parametrize("cut", [0, 11, -1])
def test_cut_out_of_range(cut):
    with pytest.raises(UserError, match="out of range|at least 1"):
        split_model(build_model("resnet20"), cut)


@pytest.mark.parametrize("norm,layer", [("group", torch.nn.GroupNorm), ("none", torch.nn.Identity)])
@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_other_norms_build_and_run(name, norm, layer):
    model = build_model(name, width=0.5, norm=norm)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.BatchNorm2d not in kinds and layer in kinds  # the norm asked for, and no BatchNorm
    head, _ = split_model(model, 1)
    assert [type(m) for m in head.modules() if not isinstance(m, torch.nn.Sequential)] == \
        [torch.nn.Conv2d, layer, torch.nn.ReLU]
    model.train()
    x = torch.randn(4, 3, 32, 32)
    # Without BatchNorm a sample's output does not depend on the rest of its batch.
    assert torch.allclose(model(x)[:2], model(x[:2]), rtol=1e-4, atol=1e-5)
