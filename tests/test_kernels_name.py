"""The import name ``kernels`` is ours and Hugging Face's (model/_kernels_name.py): with theirs found first on
sys.path, as site-packages is for the console script, ``model`` still runs on this project's kernels; transformers
(the tests' reference) imports without taking ours for theirs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path, path: list[Path]) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from ``cwd`` (not the repository root) with ``path`` first on sys.path,
    then the repository root (as an editable install puts it: after site-packages' packages)."""
    env = {"PYTHONPATH": ":".join(str(p) for p in path), "PATH": "/usr/bin:/bin"}
    prelude = f"import sys; sys.path.append({str(ROOT)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True
    )


def _impostor(tmp_path: Path) -> Path:
    """A stand-in for Hugging Face's package: a top-level ``kernels`` with none of our names."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("IMPOSTOR = True\n")
    return site


def test_model_binds_our_kernels_ahead_of_a_package_of_the_same_name(tmp_path):
    site = _impostor(tmp_path)
    code = """
        import kernels
        assert getattr(kernels, "IMPOSTOR", False)  # the stand-in is what sys.path finds first
        """
    r = _python(code, tmp_path, [site])
    assert r.returncode == 0, r.stderr
    code = """
        import sys
        import model
        assert "torch" not in sys.modules and "kernels" not in sys.modules  # binding imports nothing
        import kernels, kernels.rmsnorm
        from kernels import Ops, reference
        print(kernels.__file__, kernels.rmsnorm.__file__)
        """
    r = _python(code, tmp_path, [site])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(ROOT / "kernels" / "__init__.py"), str(ROOT / "kernels" / "rmsnorm.py")]


def test_the_other_package_imported_first_is_one_clear_error(tmp_path):
    r = _python("import kernels\nimport model\n", tmp_path, [_impostor(tmp_path)])
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: the module 'kernels' already imported is ") and "not this project's" in last
    assert "Hugging Face's kernels package shares its name; import model before it" in last


def test_transformers_imports_beside_our_kernels():
    """conftest.py ran hide_hub_kernels(): transformers reports hub kernels unavailable and off, and its Llama (which
    imports its hub-kernels integration) loads with our ``kernels`` in sys.modules."""
    import transformers.utils.import_utils as import_utils
    from transformers.models.llama import modeling_llama  # noqa: F401  (imported transformers' hub kernels: failed)

    import kernels

    assert Path(kernels.__file__) == ROOT / "kernels" / "__init__.py"
    assert sys.modules["kernels"] is kernels
    assert import_utils.is_kernels_available() is False
    assert os.environ["USE_HUB_KERNELS"] == "NO"
