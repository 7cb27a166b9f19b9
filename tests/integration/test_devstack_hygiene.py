"""What the tests start, they clean up: a redis-server's work directory is gone once it is closed."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

from extproc.devstack.redis_proc import start_redis_server


def test_a_closed_redis_server_leaves_nothing_in_the_temp_folder() -> None:
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "tm-redis-*")))
    server = start_redis_server()
    server.restart()  # a restart keeps the same directory (and data dir) until the end
    assert os.path.isdir(server.workdir)
    server.close()
    assert not os.path.exists(server.workdir)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "tm-redis-*"))) <= before


def test_a_server_given_a_directory_does_not_remove_it() -> None:
    workdir = tempfile.mkdtemp(prefix="tm-own-")
    try:
        server = start_redis_server(workdir=workdir)
        server.close()
        assert os.path.isdir(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
