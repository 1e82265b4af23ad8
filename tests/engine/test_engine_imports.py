"""The engine's import graph: the run driver, plan, device loop, telemetry and cluster executor import one way.

Built with the package-wide helpers of ``tests/test_import_graph.py`` (from the source, deferred imports
included). The whole ``cellstrata.engine`` package, ``engine/models`` included, has no import cycle but
the one of :data:`NOT_YET_ACYCLIC`, and no module takes another's private names.
"""

from __future__ import annotations

import pytest
from test_import_graph import all_imports, cycles, package_graph, private_imports

ENGINE = "cellstrata.engine"
# store.py imports export.py (Store.to_anndata) and export.py imports store.py for an annotation only
# (under TYPE_CHECKING); delete the line once that import is gone
NOT_YET_ACYCLIC: tuple[tuple[str, ...], ...] = ()
RUN = {m: f"{ENGINE}.{m}" for m in ("run", "plan", "telemetry", "cluster", "progress")} | {
    "pipeline": f"{ENGINE}.device.pipeline"
}


def engine_graph() -> dict[str, set[str]]:
    """The engine's modules and the imports among them."""
    return {m: {t for t in targets if in_engine(t)} for m, targets in package_graph().items() if in_engine(m)}


def in_engine(name: str) -> bool:
    return name == ENGINE or name.startswith(f"{ENGINE}.")


def test_engine_has_no_import_cycle():
    graph = engine_graph()
    assert {f"{ENGINE}.models.base", *RUN.values()} <= set(graph)
    found = cycles(graph)
    assert found == [sorted(line) for line in NOT_YET_ACYCLIC], found
    on_cycle = {m for part in found for m in part}
    assert not on_cycle & set(RUN.values())


def test_run_driver_over_device_loop_over_plan():
    """run -> pipeline -> plan -> store; cluster sees the device loop and the plan, never the run driver."""
    graph = engine_graph()
    run, plan, pipeline, telemetry, cluster = (RUN[m] for m in ("run", "plan", "pipeline", "telemetry", "cluster"))
    assert {pipeline, plan, telemetry, cluster} <= graph[run]  # cluster: deferred, only for --cluster
    assert {plan, telemetry} <= graph[pipeline] and "cellstrata.kernels" in package_graph()[pipeline]
    assert run not in graph[pipeline] | graph[cluster] | graph[plan] | graph[telemetry]
    assert {pipeline, plan, telemetry} <= graph[cluster]
    assert graph[telemetry] <= {RUN["progress"]}
    assert not {pipeline, cluster} & graph[plan]


def test_no_private_names_cross_engine_modules():
    bad = [i for i in private_imports(all_imports()) if in_engine(i.importer) or in_engine(i.target)]
    assert not bad, "\n".join(map(str, bad))


def test_the_engine_check_sees_a_planted_cycle(monkeypatch):
    """The cycle check fails when the device loop imports the run driver back."""
    import test_import_graph

    real = test_import_graph.package_graph

    def planted() -> dict[str, set[str]]:
        graph = real()
        graph[RUN["pipeline"]] = graph[RUN["pipeline"]] | {RUN["run"]}
        return graph

    monkeypatch.setattr(test_import_graph, "package_graph", planted)
    monkeypatch.setitem(globals(), "package_graph", planted)
    parts = cycles(engine_graph())
    assert any({RUN["run"], RUN["pipeline"]} <= set(part) for part in parts), parts


# What each folder of the engine may import from the rest of the engine (besides itself and ``errors``):
# the data flows input -> models -> device -> storage, and only the run modules at the top see all of them.
FOLDER_REACH = {
    "input": {"models"},  # the tokenizers it runs ahead of the device
    "models": {"input"},  # CellBlock, the synthetic genes of random checkpoints
    "device": {"input", "models", "storage", "plan", "telemetry", "progress", "interrupts"},
    "storage": {"models"},  # the weights record of an export's provenance
}


def test_folders_follow_the_data_flow():
    def place(module: str) -> str | None:
        parts = module.split(".")
        return parts[2] if len(parts) > 2 and parts[:2] == ["cellstrata", "engine"] else None

    graph = engine_graph()
    assert set(FOLDER_REACH) <= {place(m) for m in graph}
    wrong = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if place(m) in FOLDER_REACH
        for t in targets
        if place(t) not in {place(m), "errors", None, *FOLDER_REACH[str(place(m))]}
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_the_folder_check_sees_the_store_reaching_back_into_the_device_loop(monkeypatch):
    real = package_graph
    writer = f"{ENGINE}.storage.writer"

    def planted() -> dict[str, set[str]]:
        graph = real()
        graph[writer] = graph[writer] | {RUN["pipeline"]}
        return graph

    monkeypatch.setitem(globals(), "package_graph", planted)
    with pytest.raises(AssertionError, match=r"storage\.writer imports cellstrata\.engine\.device\.pipeline"):
        test_folders_follow_the_data_flow()
