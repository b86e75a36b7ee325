"""The package layout: kernels/ ships as fastalign.kernels, never as a top-level ``kernels`` module."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_as_fastalign_kernels():
    import fastalign.kernels.lse_forward as module

    assert Path(module.__file__).resolve().parent == ROOT / "kernels"


@pytest.mark.slow
def test_wheel_contains_the_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True, timeout=300)
    (wheel,) = tmp_path.glob("fastalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernel_files = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert kernel_files <= {Path(n).name for n in names if n.startswith("fastalign/kernels/")}
    assert not any(n.startswith("kernels/") for n in names), "kernels must not ship as a top-level package"
    assert "fastalign/ops/torch_backend.py" in names
