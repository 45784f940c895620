"""Build the wheel, install it into a fresh virtual environment and, from outside the
repository, import every module of every mapped package and run `graphopt --help`.

This catches the package-dir trap: a subpackage missing from pyproject's package list works
in an editable install but is absent from the wheel.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"graphopt": "graphopt", "graphopt.passes": "passes", "graphopt.backends": "backends",
           "graphopt.train": "train"}
TORCH = os.environ.get("TORCH", "torch==2.13.0")


def source_modules() -> list[str]:
    names = []
    for pkg, folder in MAPPING.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if parts and parts[-1] == "__main__":
                continue
            names.append(".".join([pkg, *parts]))
    return names


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kw)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="graphopt-wheel-") as tmp:
        tmp = Path(tmp)
        run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp / "dist"), str(ROOT)],
            stdout=subprocess.DEVNULL)
        (wheel,) = (tmp / "dist").glob("graphopt-*.whl")
        run([sys.executable, "-m", "venv", str(tmp / "venv")])
        py = tmp / "venv" / "bin" / "python"
        run([py, "-m", "pip", "install", "-q", *TORCH.split()])
        run([py, "-m", "pip", "install", "-q", f"{wheel}[dev]"])
        modules = source_modules()
        check = (
            "import importlib, sys\n"
            f"mods = {modules!r}\n"
            "for m in mods:\n"
            "    mod = importlib.import_module(m)\n"
            f"    assert {str(ROOT)!r} not in (mod.__file__ or ''), (m, mod.__file__)\n"
            "print(f'imported {len(mods)} modules from the installed wheel')\n"
        )
        run([py, "-c", check], cwd=tmp)
        run([tmp / "venv" / "bin" / "graphopt", "--help"], cwd=tmp, stdout=subprocess.DEVNULL)
        run([py, "-m", "graphopt", "inspect", str(ROOT / "examples" / "tiny_mlp.onnx")], cwd=tmp,
            stdout=subprocess.DEVNULL)
    print("wheel check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
