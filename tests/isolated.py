"""Where the tests keep caches, weights and job history (out of the user's home), for the test processes
(conftest._isolated_state) and for the Ray workers the scaled-run tests start.

(Kept out of conftest.py: several conftest modules share one import name in one pytest session.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def isolated_environment(tmp_path_factory) -> dict[str, str]:
    """The variables that point farslip's state, cache and the hub at the session's own folders."""
    root = tmp_path_factory.getbasetemp() / "farslip-home"
    return {"FARSLIP_HOME": str(root / "state"), "FARSLIP_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}


def start_local_ray(tmp_path_factory, cpus: int) -> Iterator[None]:
    """A local Ray of `cpus` CPUs whose workers get the isolated folders in their environment: a module's Ray
    starts before its first test sets them, and its workers read and wrote the user's own cache."""
    ray = pytest.importorskip("ray")  # the ray extra: installed by `make setup`
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": isolated_environment(tmp_path_factory)})
    yield
    ray.shutdown()
