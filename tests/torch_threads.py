"""A fixture for the training tests: torch on one thread (imported into a test module, it applies to
that module only)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One thread: the machine's cores are shared, and torch's spinning threads slow down badly then."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
