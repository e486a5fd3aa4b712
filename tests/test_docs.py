"""The documentation builds with warnings as errors.

A broken cross-reference, a bad directive or an autodoc import failure is
a Sphinx warning; with C{-W} it fails this test with Sphinx's own message,
so it fails CI instead of being found by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def require_sphinx() -> None:
    """Skip without Sphinx here; in CI (the test extra installs it) fail."""
    try:
        import sphinx  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("sphinx is missing although the test extra installs it")
        pytest.skip("sphinx is not installed (pip install sphinx, or the test extra)")


def build(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """C{sphinx -W -b html source out}, as docs/conf.py says to build."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",  # warnings are errors
            "--keep-going",  # ... but report all of them
            "-q",
            "-b",
            "html",
            "-d",
            str(out / ".doctrees"),
            str(source),
            str(out / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_docs_build_without_warnings(tmp_path: Path) -> None:
    require_sphinx()
    result = build(DOCS, tmp_path)
    assert 0 == result.returncode, (
        f"the docs do not build cleanly:\n{result.stderr}{result.stdout}"
    )
    assert (tmp_path / "html" / "index.html").exists()


def test_a_broken_reference_fails_the_build(tmp_path: Path) -> None:
    """The check itself: the same build of a page with a dangling :ref:
    fails, and says which label (docs/conf.py, one small page)."""
    require_sphinx()
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(DOCS / "conf.py", source / "conf.py")
    (source / "index.rst").write_text(
        "Broken\n======\n\nSee :ref:`no-such-label-anywhere`.\n"
    )
    result = build(source, tmp_path / "out")
    assert 0 != result.returncode
    assert "no-such-label-anywhere" in result.stderr, result.stderr
