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


def _import_from_checkout(code: str, *flags: str) -> subprocess.CompletedProcess:
    """Run ``code`` with the repository root first on sys.path (as ``python -m pytest`` or a script there does)."""
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_top_level_kernels_is_not_this_folder():
    """The name ``kernels`` belongs to Hugging Face's package (required by transformers >= 5.25): from a checkout's
    root it must resolve to that package, and without it fail as a missing module, never to kernels/ here."""
    run = _import_from_checkout("import kernels, sys; print(kernels.__file__); "
                                "print(sys.modules['kernels'] is kernels)")
    lines = run.stdout.split()
    if run.returncode == 0:
        assert Path(lines[0]).resolve().parent != ROOT / "kernels" and lines[1] == "True", run.stdout
    else:
        assert "ModuleNotFoundError" in run.stderr, run.stderr
    # no site-packages at all (python -S): the folder must not stand in for the missing package
    run = _import_from_checkout("import kernels", "-S")
    assert run.returncode != 0 and "ModuleNotFoundError: No module named 'kernels'" in run.stderr, run.stderr


def test_transformers_imports_from_a_checkout():
    pytest.importorskip("transformers")
    run = _import_from_checkout("import transformers.integrations.hub_kernels")
    assert run.returncode == 0, run.stderr[-2000:]


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
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "fastalign").rglob("*.py")}
    assert sources <= set(names), f"missing from the wheel: {sorted(sources - set(names))}"
