"""The three-node cluster the package's tests share: started once (the S3-compatible server first,
so that every node's environment names it), stopped by process group after the package's last
test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fixtures_cluster import LocalCluster


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3_server) -> Iterator[LocalCluster]:
    rig = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()
