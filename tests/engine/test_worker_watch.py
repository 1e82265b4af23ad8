"""A Dask cluster left without workers ends the run in one error instead of a wait that never ends."""

from __future__ import annotations

import pytest

from cellstrata.engine.cluster import WorkerWatch, await_result
from cellstrata.engine.errors import CellstrataError


class FakeClient:
    def __init__(self, workers: list[dict]) -> None:
        self.workers = workers  # what each scheduler_info call sees, the last one repeated

    def scheduler_info(self, n_workers: int = -1) -> dict:
        w = self.workers.pop(0) if len(self.workers) > 1 else self.workers[0]
        return {"workers": w}


class FakeFuture:
    def __init__(self, timeouts: int, value: object = "done") -> None:
        self.timeouts, self.value = timeouts, value

    def result(self, timeout: float | None = None) -> object:
        if self.timeouts:
            self.timeouts -= 1
            raise TimeoutError
        return self.value


def test_no_worker_for_longer_than_patience_is_one_error() -> None:
    with pytest.raises(CellstrataError, match="no worker for 0 s") as err:
        await_result(FakeClient([{}]), FakeFuture(timeouts=10**9), patience=0.05)
    assert "re-run the same command" in str(err.value) and "\n" not in str(err.value)


def test_a_cluster_with_workers_is_waited_on() -> None:
    client = FakeClient([{"w1": {}}])
    assert await_result(client, FakeFuture(timeouts=50), patience=0.0) == "done"


def test_a_worker_coming_back_resets_the_clock() -> None:
    watch = WorkerWatch(FakeClient([{}, {"w": {}}, {}]), patience=60)
    watch.check()
    assert watch.alone_since is not None
    watch.check()
    assert watch.alone_since is None
    watch.check()
    assert watch.alone_since is not None
