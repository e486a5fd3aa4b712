"""The package type-checks (mypy with mypy-zope, settings in setup.cfg)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .helpers import ROOT


def test_mypy_clean() -> None:
    """mypy finds no errors in twisted_smtpd (it once caught a swapped call)."""
    pytest.importorskip("mypy")
    pytest.importorskip("mypy_zope")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "twisted_smtpd"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
