"""The deployment path: an exported .onnx model predicts (and serves) without torch, through the CLI, and a
fresh virtual environment with no torch in it installs the base package and runs that path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serve_client import ServerProcess, post_files
from tiny_run import export_tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("deploy"))


def _val(data: Path) -> list[str]:
    return [str(p) for p in sorted((data / "val").rglob("*.png"))]


def _torch_free(code: str) -> str:
    """stdout of `code` run in a fresh interpreter, which must not have imported torch by its end."""
    check = "\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    proc = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cli_predict_with_the_onnx_engine_imports_no_torch(exported):
    data, _, model = exported
    stdout = _torch_free(
        "from transferkit.cli import main\n"
        f"code = main(['predict', {str(model)!r}, {str(data / 'val')!r}, '--engine', 'onnx', '--format', 'json'])\n"
        "assert code == 0, code\n")
    assert len(json.loads(stdout)) == len(_val(data))


def test_serving_the_onnx_model_imports_no_torch(exported):
    pytest.importorskip("starlette")
    _torch_free(
        "from transferkit.cli import build_parser\n"
        "from transferkit.serve import ServeOptions\n"
        "from transferkit.serve.app import create_app\n"
        "from transferkit.serve.model import load_served_model\n"
        "build_parser().parse_args(['serve', 'model.onnx'])\n"
        f"app = create_app(load_served_model({str(exported[2])!r}), ServeOptions())\n")


def test_a_training_command_without_torch_names_the_extra_to_install(tiny_folder):
    code = ("import sys\nsys.modules['torch'] = None  # as on a box with only the base install\n"
            f"from transferkit.cli import main\nsys.exit(main(['train', {str(tiny_folder)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("transferkit: error: `transferkit train` needs the train extra (torch is not "
                                   "installed): pip install 'transferkit[train]' (a .onnx model predicts without "
                                   "it: --engine onnx)")


def _bare_env() -> dict:
    """The environment without this checkout's PYTHONPATH (the fresh venv must use what it installed)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _install_without_torch(tmp_path: Path) -> Path:
    """A new venv (no system site-packages) with this checkout installed as `transferkit[serve]`; a copy of
    the sources is installed so that the build leaves nothing in the checkout."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_bare_env(), timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{source}[serve]"],
                         capture_output=True, text=True, env=_bare_env(), timeout=1200)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_a_fresh_venv_without_torch_installs_and_runs_the_deployment_path(exported, tmp_path):
    data, _, model = exported
    venv = _install_without_torch(tmp_path)
    python, transferkit = str(venv / "bin" / "python"), str(venv / "bin" / "transferkit")
    has_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, env=_bare_env())
    assert has_torch.returncode != 0, "torch is importable in the fresh venv"

    command = ["predict", str(model), *_val(data), "--engine", "onnx", "--format", "json"]
    there = subprocess.run([transferkit, *command], capture_output=True, text=True, env=_bare_env(), timeout=300)
    assert there.returncode == 0, there.stderr
    here = subprocess.run([sys.executable, "-m", "transferkit", *command], capture_output=True, text=True, timeout=300)
    assert json.loads(there.stdout) == json.loads(here.stdout)

    training = subprocess.run([transferkit, "train", str(data)], capture_output=True, text=True, env=_bare_env())
    assert training.returncode == 2 and "pip install 'transferkit[train]'" in training.stderr

    server = ServerProcess([transferkit, "serve", str(model), "--port", "0"], tmp_path, env=_bare_env())
    try:
        image = Path(_val(data)[0])
        status, body = post_files(server.url, [(image.name, image.read_bytes())])
    finally:
        assert server.stop(), server.log.read_text()
    assert status == 200 and body["predictions"][0]["label"] == json.loads(here.stdout)[0]["label"]


def test_the_package_lists_its_api_without_importing_torch():
    stdout = _torch_free("import transferkit as tk\nprint(' '.join(dir(tk)))\n")
    assert {"train", "load", "resume", "Classifier", "TrainConfig", "__version__"} <= set(stdout.split())
