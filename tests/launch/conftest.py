"""The `slurm_cluster` fixture: a real two-node Slurm cluster on this machine for one test module.

Set up by tests/launch/local_slurm.py when root and apt-get are available (it installs slurm-wlm
and munge if needed), stopped after the module; otherwise the tests that use it skip with the
reason. TESSERA_SLURM_TESTS=0 skips them without touching the machine.
"""

from __future__ import annotations

import os

import local_slurm
import pytest


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = local_slurm.unavailable_reason()
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    cluster = local_slurm.start()
    saved = {key: os.environ.get(key) for key in cluster.env}
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
