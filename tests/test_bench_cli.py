"""``cellstrata bench`` and the pieces of the benchmark suite that can be checked without running it.

The quick suite itself takes minutes on two cores, so it is not run here: the command's wiring, the
model-FLOP count against a hand count, the peers' batch-size choice and the targets are.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from benchmark_package import FOLDER as BENCH
from benchmark_package import ROOT, benchmark, package

from cellstrata import cli

roofline = benchmark("roofline")
throughput = benchmark("throughput")


def test_bench_help_shows_the_suite_options(capfd):
    assert cli.main(["bench", "--help"]) == 0
    out = capfd.readouterr().out
    assert "throughput.py" in out
    assert "--peer-batch" in out and "--official-cells" in out


def test_bench_roofline_help(capfd):
    assert cli.main(["bench", "roofline", "--help"]) == 0
    assert "--throughput" in capfd.readouterr().out


def test_bench_without_benchmarks_folder_is_one_clear_error(monkeypatch, tmp_path, capfd):
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path / "site-packages" / "benchmarks")
    called = []
    monkeypatch.setattr("subprocess.call", lambda *a, **k: called.append(a) or 0)
    assert cli.main(["bench", "--quick"]) != 0
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "source checkout" in err and "Traceback" not in err
    assert not called


def test_bench_forwards_its_arguments(monkeypatch):
    seen = []
    monkeypatch.setattr("subprocess.call", lambda cmd, **k: seen.append(cmd) or 3)
    assert cli.main(["bench", "--quick", "--device", "cuda"]) == 3  # the script's exit status
    assert seen[0][1:] == [str(BENCH / "throughput.py"), "--quick", "--device", "cuda"]
    assert cli.main(["bench", "roofline", "--quick"]) == 3
    assert seen[1][1:] == [str(BENCH / "roofline.py"), "--quick"]


def test_forward_flops_match_a_hand_count_for_scgpt_tiny():
    ld = throughput.build_in_memory("scgpt", "tiny", device="meta", weights=False)
    shape = roofline.flop_shape(ld.model)
    d, ffn, layers = 64, 128, 4  # scGPT tiny: embsize 64, d_hid 128, 4 layers
    assert shape == {
        "n_layers": layers,
        "hidden": d,
        "block_weights": 3 * d * d + d * d + 2 * d * ffn,  # in_proj (QKV), out_proj, linear1, linear2
        "embed_weights": 1 * d + d * d,  # value encoder Linear(1, d), Linear(d, d)
    }
    lengths = [10, 31]
    block = 4 * d * d + 2 * d * ffn
    hand = 2 * (10 + 31) * (layers * block + d + d * d) + 4 * layers * d * (10**2 + 31**2)
    assert roofline.forward_flops(shape, lengths) == pytest.approx(hand, rel=1e-12)
    # padding does not count: a cell is its real tokens only
    assert roofline.forward_flops(shape, [31]) < roofline.forward_flops(shape, lengths)


def test_scfoundation_counts_its_bin_matmul():
    ld = throughput.build_in_memory("scfoundation", "tiny", device="meta", weights=False)
    bins, d = ld.model.config.bin_num, ld.model.config.hidden_dim
    shape = roofline.flop_shape(ld.model)
    assert shape["embed_weights"] == bins + bins * bins + bins * d  # mlp, mlp2, softmax(bins) @ emb
    assert shape["block_weights"] == 4 * d * d + 2 * d * 4 * d


def test_peer_batch_sweep_picks_the_fastest(monkeypatch):
    rates = {8: 100.0, 16: 180.0, 32: 180.0, 64: 150.0}
    calls = []

    def fake_run_peers(spec, loaded, h5ad, n, out, *, batch_size, budget_s):
        calls.append((batch_size, n, budget_s))
        return {"loop_cells_per_s": rates[batch_size], "cells": n, "breakdown": {}}

    monkeypatch.setattr(throughput, "run_peers", fake_run_peers)
    sweep = throughput.sweep_peer_batch({}, None, "x.h5ad", [8, 16, 32, 64], 512, 0.5)
    assert sweep["best"] == 16  # fastest; the tie with 32 goes to the smaller batch
    assert sweep["cells_per_s"] == rates
    assert [c[0] for c in calls] == [8, 16, 32, 64] and all(c[1:] == (512, 0.5) for c in calls)
    assert throughput.pick_best({1: 5.0, 4: 9.0, 64: 8.0}) == 4
    with pytest.raises(ValueError):
        throughput.pick_best({})


def _shape(family, preset, b_over_a, b_over_c, mfu=None):
    return {
        "family": family,
        "preset": preset,
        "ratios": {"b_over_a": b_over_a, "b_over_c": b_over_c},
        "rows": [{"key": "cellstrata", "model_mfu": mfu}],
    }


def test_targets_are_judged_from_the_measured_values():
    shapes = [_shape("scgpt", "tiny", 0.93, 2.0), _shape("tahoe-x1", "1b", 0.97, 3.5, mfu=0.35)]
    cpu = {(t["shape"], t["target"][:10]): t["met"] for t in throughput.targets(shapes, "cpu")}
    assert cpu[("scgpt tiny", "extraction")] is True  # 0.93 >= 0.90 on CPU
    assert cpu[("scgpt tiny", "cellstrata")] is True  # 2.0 >= 1.5 on CPU
    gpu = throughput.targets(shapes, "cuda")
    met = {(t["shape"], t["target"][:10]): t["met"] for t in gpu}
    assert met[("scgpt tiny", "extraction")] is False  # 0.93 < 0.95 on GPU
    assert met[("scgpt tiny", "cellstrata")] is False  # 2.0 < 3 on GPU
    assert met[("tahoe-x1 1b", "cellstrata")] is True
    assert met[("tahoe-x1 1b", "Tahoe-X1 1")] is False  # MFU 35% < 40%
    assert "MFU 35.0%" in throughput.targets_table(gpu)
    no_peak = throughput.targets([_shape("tahoe-x1", "1b", 1.0, 4.0, mfu=None)], "cuda")
    assert [t["met"] for t in no_peak if t["target"].startswith("Tahoe")] == [None]


def test_known_cards_peak_and_unknown_cards():
    assert roofline.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert roofline.peak_bf16_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert roofline.peak_bf16_tflops("NVIDIA A10G") is None
    u = roofline.utilisation(2e12, 2.0, {"matmul": {"tflops": 4.0}, "peak_bf16_tflops": None})
    assert u["tflops"] == pytest.approx(1.0) and u["of_matmul"] == pytest.approx(0.25) and u["mfu"] is None


@pytest.mark.parametrize("name", package().BENCHMARKS)
def test_every_benchmark_runs_as_a_module(name):
    """``python -m benchmarks.NAME --help`` from the repository root: the package imports, the options parse."""
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage:") and "--results" in done.stdout, done.stdout[:500]


def test_the_package_lists_every_benchmark():
    modules = {p.stem for p in BENCH.glob("*.py")} - {"__init__", "harness", "common"}
    assert set(package().BENCHMARKS) == modules


def test_workers_run_the_same_module_from_any_folder(tmp_path):
    """A worker's command line is ``python -m benchmarks.NAME --worker SPEC``; with :func:`module_env` it runs
    whatever the working folder (the root is not on the path there)."""
    harness = benchmark("harness")
    spec_path, out_path, cmd = harness.write_spec({"n": 1}, tmp_path, "scale", "spec-")
    assert cmd == [sys.executable, "-m", "benchmarks.scale", "--worker", str(spec_path)]
    assert spec_path.parent == tmp_path and out_path == spec_path.with_suffix(".result.json")
    done = subprocess.run(
        harness.module_command("writer", "--help"),
        cwd=tmp_path,
        env=harness.module_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "--chunk-mb" in done.stdout, done.stderr[-3000:]
    name = harness.result_name("kernels", harness.name_slug("NVIDIA H100 80GB HBM3", "cuda"), _day(), "-quick")
    assert name == "kernels-nvidia-h100-80gb-hbm3-2026-12-06-quick"


def _day():
    import datetime as dt

    return dt.datetime(2026, 12, 6, 13, 0, tzinfo=dt.timezone.utc)


def test_a_second_result_of_the_day_keeps_the_first(tmp_path):
    harness = benchmark("harness")
    name = harness.result_name("tokenize", "cpu", _day())
    first = harness.save_results(tmp_path, name, {"run": 1}, "one\n", echo=False)
    (tmp_path / f"{name}-2.md").write_text("a stray markdown file\n")  # either file keeps a name taken
    second = harness.save_results(tmp_path, name, {"run": 2}, "two\n", echo=False)
    assert first.name == name and second.name == f"{name}-3"
    assert json.loads((tmp_path / f"{name}.json").read_text()) == {"run": 1}
    assert (tmp_path / f"{name}.md").read_text() == "one\n" and (tmp_path / f"{name}-3.md").read_text() == "two\n"
