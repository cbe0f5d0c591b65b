import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    """Tests marked `mac` need an Apple GPU; elsewhere they are skipped with the reason."""
    try:
        import torch

        has_mps = torch.backends.mps.is_available()
    except Exception:  # torch missing or without MPS support
        has_mps = False
    if has_mps:
        return
    skip = pytest.mark.skip(reason="needs an Apple GPU (MPS); run `python -m mtlflash check` on a Mac")
    for item in items:
        if "mac" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Every test starts with the tier and thread choice at their defaults."""
    monkeypatch.delenv("MTLFLASH_KERNEL", raising=False)
    monkeypatch.delenv("MTLFLASH_NUM_THREADS", raising=False)


def pytest_terminal_summary(terminalreporter):
    """Modules that count what they checked (e.g. test_fuzz's examples) report it here."""
    for name in ("test_fuzz",):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "summary_lines"):
            for line in module.summary_lines():
                terminalreporter.write_line(line)
