"""The scaled-run tests' local Ray (isolated.start_local_ray): its workers keep caches where the tests do."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from isolated import start_local_ray


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory) -> Iterator[None]:
    yield from start_local_ray(tmp_path_factory, 1)
