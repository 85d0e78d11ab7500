"""The installed distribution puts one name in site-packages: ``flaxchat`` (its subpackages are the
repository's top-level folders, mapped in ``pyproject.toml``)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "flaxchat", "model", "sampling", "chat", "serve", "checkpoints")


def test_wheel_holds_only_the_flaxchat_namespace(tmp_path):
    tree = tmp_path / "src"
    for name in SOURCES:  # a copy, so the build leaves nothing in the checkout
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy(source, tree / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                             "-w", str(tmp_path / "dist"), str(tree)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("flaxchat-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"flaxchat"}
    for module in ("flaxchat/__init__.py", "flaxchat/model/transformer.py", "flaxchat/model/kernels/qmatmul.cc",
                   "flaxchat/sampling/engine.py", "flaxchat/chat/template.py", "flaxchat/serve/app.py",
                   "flaxchat/cli.py", "flaxchat/checkpoints/store.py"):
        assert module in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "flaxchat = flaxchat.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
