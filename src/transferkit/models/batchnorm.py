"""BatchNorm with fixed statistics, folded into the convolution before it.

A BatchNorm layer in eval mode is a per-channel affine map, so conv → BN equals one conv with weight
W·s and bias β − μ·s (s = γ / √(σ² + ε)). Computing that weight costs a few thousand multiplies per
layer; running BN costs several passes over every activation, forward and backward. On a CPU that is
about a sixth of a fine-tuning step (benchmarks/RESULTS.md), so:

- evaluation always runs folded (identical outputs, within float rounding);
- `--batchnorm frozen` keeps every BN layer on its ImageNet statistics while its γ and β still learn
  (the usual "frozen BN" of small-batch fine-tuning), and then training runs folded too.

Folding patches `forward` on the module instances, so parameter names, state_dict, checkpoints and
exports are untouched; `unfold` restores the modules' own forward.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Conv → BN pairs: a plain (or timm 'same'-padded) Conv2d registered directly before the BatchNorm2d
    that normalises its output. Registration order is the data flow in every registered backbone; the
    tests check folded == unfolded for each of them."""
    pairs = []
    for parent in model.modules():
        children = list(parent.children())
        for conv, bn in zip(children, children[1:]):
            if (_foldable_conv(conv) and type(bn) in _BN_AFTER
                    and bn.num_features == conv.out_channels and bn.running_mean is not None):
                pairs.append((conv, bn))
    return pairs


def freeze_statistics(model: nn.Module) -> None:
    """Every BN layer normalises with its running statistics (eval mode); its γ, β may still learn."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class Folding:
    """Folds the conv → BN pairs of one model whose BN is in eval mode. Call fold() again after every
    train()/eval() switch: it re-decides which pairs fold."""

    def __init__(self, model: nn.Module):
        self.pairs = conv_bn_pairs(model)
        self.folded: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def fold(self) -> int:
        self.unfold()
        self.folded = [(conv, bn) for conv, bn in self.pairs if not bn.training]
        for conv, bn in self.folded:
            conv.forward = partial(_folded_conv, conv, bn)
            bn.forward = partial(_BN_AFTER[type(bn)], bn)
        return len(self.folded)

    def unfold(self) -> None:
        for conv, bn in self.folded:
            del conv.forward, bn.forward  # the class's own forward again
        self.folded = []


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    if bn.training:  # batch statistics cannot be folded; fold() must follow every mode switch
        raise RuntimeError("a folded BatchNorm layer was switched to train mode; call Folding.fold() again")
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    if _is_same_padded(conv):  # timm's TF-style 'same' padding: pad, then an unpadded conv
        from timm.layers.padding import pad_same

        x = pad_same(x, conv.weight.shape[-2:], conv.stride, conv.dilation)
        return F.conv2d(x, weight, shift, conv.stride, 0, conv.dilation, conv.groups)
    return conv._conv_forward(x, weight, shift)


def _after_plain_bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    return x  # the folded conv already normalised


def _after_bn_act(bn, x: torch.Tensor) -> torch.Tensor:
    return bn.act(bn.drop(x))  # timm's BatchNormAct2d: BN, then dropout and activation


def _bn_after_types() -> dict:
    kinds = {nn.BatchNorm2d: _after_plain_bn}
    try:
        from timm.layers import BatchNormAct2d

        kinds[BatchNormAct2d] = _after_bn_act
    except ImportError:  # timm is optional for the torchvision backbones
        pass
    return kinds


_BN_AFTER = _bn_after_types()


def _foldable_conv(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d or _is_same_padded(module)


def _is_same_padded(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv2dSame" and isinstance(module, nn.Conv2d)
