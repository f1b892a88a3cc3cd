"""The package installs as one import package from a regular (non-editable) wheel, configs included."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import florence

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_resolve():
    for name in ("create_model", "list_models", "load_weights", "from_pretrained", "UniCLLoss"):
        assert callable(getattr(florence, name))
    with pytest.raises(AttributeError):
        florence.no_such_name


def test_cli_lists_models(capsys):
    from florence.cli import main

    assert main(["models", "coswin_*"]) == 0
    out = capsys.readouterr().out.split()
    assert "coswin_tiny" in out and "swin_tiny" not in out
    assert main(["no-such-command"]) == 2


@pytest.mark.slow
def test_wheel_installs_subpackages_and_configs(tmp_path):
    # build from a copy: setuptools leaves build/ and *.egg-info in the source tree it builds
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__"))
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(source)], check=True
    )
    (wheel,) = wheel_dir.glob("florence_vision-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "florence/__init__.py",
        "florence/backbone/coswin.py",
        "florence/adapters/__init__.py",
        "florence/heads/__init__.py",
        "florence/benchmarks/__init__.py",
        "florence/configs/models/unicl_test.json",
        "florence/configs/pretrain/fashion_mnist.yaml",
    ):
        assert expected in names, expected
    # the wheel's files, first on sys.path, must provide every subpackage (not this checkout's folders)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import florence, florence.backbone.coswin as c;"
        "assert c.__file__.startswith(sys.argv[1]), c.__file__;"
        "assert 'unicl_test' in florence.list_models(); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code, str(target)], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok"
