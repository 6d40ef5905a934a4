"""Test setup: 8 simulated CPU devices, set before the JAX backend starts."""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def _slow_ids():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_tests.txt")
    with open(path) as f:
        return {line.split("#")[0].strip() for line in f} - {""}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the tests listed in ``tests/slow_tests.txt`` ``slow`` (before ``-m`` deselects)."""
    ids = _slow_ids()
    found = set()
    for item in items:
        nid = item.nodeid if item.nodeid.startswith("tests/") else "tests/" + item.nodeid
        if nid in ids:
            item.add_marker(pytest.mark.slow)
            found.add(nid)
    if items and len({i.nodeid.split("::")[0] for i in items}) > 20 and ids - found:
        raise pytest.UsageError(f"tests/slow_tests.txt names tests that do not exist: {sorted(ids - found)[:3]}")
