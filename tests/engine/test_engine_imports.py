"""The engine's import graph: the run driver, plan, device loop, telemetry and cluster executor import one way.

Built with the package-wide helpers of ``tests/test_import_graph.py`` (from the source, deferred imports
included). The whole ``cellstrata.engine`` package, ``engine/models`` included, has no import cycle but
the one of :data:`NOT_YET_ACYCLIC`, and no module takes another's private names.
"""

from __future__ import annotations

from test_import_graph import all_imports, cycles, package_graph, private_imports

ENGINE = "cellstrata.engine"
# store.py imports export.py (Store.to_anndata) and export.py imports store.py for an annotation only
# (under TYPE_CHECKING); delete the line once that import is gone
NOT_YET_ACYCLIC: tuple[tuple[str, ...], ...] = ()
RUN = {m: f"{ENGINE}.{m}" for m in ("run", "plan", "pipeline", "telemetry", "cluster", "progress")}


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
