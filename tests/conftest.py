"""Mark tests by folder so markers never drift from the layout; shared fixtures."""

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Loading a model.py changes sys.path and sys.modules; undo both after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("model_", "lmi_test")):  # only what the tests' own files defined
            del sys.modules[name]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
