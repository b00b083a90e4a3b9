"""Shared test setup: a 2-core CPU, offline, deterministic."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

from imagen.cli import OFFLINE_ENV

for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import CORES  # noqa: E402

# Under pytest-xdist (`make test` runs 2 workers) the workers share the cores; tiny.env gives
# the `imagen` subprocesses a test starts the same share.
torch.set_num_threads(CORES)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """For tiny nets: one thread is as fast, and immune to a busy neighbour's cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One real Prefect server on 127.0.0.1 for the whole session (started with flows/serve.py's
    own functions, stopped by pid): starting one costs ~30 s on this CPU. Yields the client
    settings (PREFECT_HOME, PREFECT_API_URL) a flow run or a CLI call needs."""
    from flows.serve import prefect_env, start_server, stop, wait_healthy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home: Path = tmp_path_factory.mktemp("prefect-home")
    env = prefect_env(port, home) | {"PREFECT_UI_ENABLED": "false"}
    proc = start_server(port, env)
    try:
        wait_healthy(env["PREFECT_API_URL"], proc=proc)
        yield {"PREFECT_HOME": env["PREFECT_HOME"], "PREFECT_API_URL": env["PREFECT_API_URL"]}
    finally:
        stop(proc)


# The longest files as CI measured them (`--durations`), longest first
LONGEST = ("test_flow.py", "test_train_faults.py", "test_pipeline.py", "test_train.py",
           "test_ddp.py", "test_fsdp.py")  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first, then those with the most ``slow`` tests (under pytest-xdist's
    ``--dist loadfile`` the long ones start early and the quick ones fill the end); tests
    marked ``gpu`` run where CUDA is, and are skipped with the reason elsewhere."""
    slow: dict[Path, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + ("slow" in item.keywords)

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        return (LONGEST.index(name) if name in LONGEST else len(LONGEST), -slow[item.path])

    items.sort(key=rank)  # stable: a file's own order is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
