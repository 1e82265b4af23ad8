"""End to end: AnnData -> tiny scGPT -> store; batch invariance, resume after kill, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import zarr

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.device.batching import collate
from cellstrata.engine.errors import WriteError
from cellstrata.engine.input.datasets import synthetic_dataset
from cellstrata.engine.input.sources import open_source
from cellstrata.engine.models import get_family
from cellstrata.engine.storage import writer as writer_mod

N_CELLS = 150


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return get_family("scgpt").init_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "scgpt", seed=3)


@pytest.fixture(scope="module")
def adata():
    return synthetic_dataset(N_CELLS, 2000, seed=5, genes_per_cell=150)


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory, adata) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def run(h5ad, ckpt, out, **kw):
    kw.setdefault("poolings", ["all"])
    kw.setdefault("dtype", "float32")
    kw.setdefault("chunk_cells", 32)
    return cs.extract(h5ad, model="scgpt", checkpoint=ckpt, out=out, progress=False, **kw)


def tap_states(model, batch, bf16: bool = False) -> dict[int, torch.Tensor]:
    """Float64 (CPU) copy of row 0 of every layer's hidden state; ``bf16``: under the pipeline's CUDA autocast."""
    states: dict[int, torch.Tensor] = {}
    device = batch.lengths.device.type
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        model.forward(batch, lambda layer, h: states.__setitem__(layer, h[0].double().cpu().clone()))
    return states


def read_all(store) -> dict[str, np.ndarray]:
    return {p: store.layers(p).compute() for p in store.poolings}


def test_store_holds_every_layer_of_every_cell(h5ad, ckpt, adata, tmp_path):
    store = run(h5ad, ckpt, tmp_path / "s.zarr")
    # the reference runs where the store was computed (device="auto"), at its precision (bf16 autocast on CUDA)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = get_family("scgpt").load(ckpt, device=device)
    n_layers, hidden = loaded.n_layers, loaded.hidden_size
    assert store.is_complete and store.attrs["complete"] is True
    assert set(store.poolings) == {"mean", "max", "cls", "official"}
    values = read_all(store)
    for arr in values.values():
        assert arr.shape == (n_layers + 1, N_CELLS, hidden) and np.isfinite(arr).all()
    assert list(store.obs_names()) == list(adata.obs_names)

    # Independent computation: each cell alone through the model, pooled by hand in float64.
    with open_source(h5ad) as src:
        mapping = loaded.tokenizer.map_genes(list(src.gene_names))
        tokens = loaded.tokenizer.tokenize(src.read(0, N_CELLS), mapping)
    n_tokens = np.asarray(store.group["n_tokens"][:])
    np.testing.assert_array_equal(n_tokens, tokens.lengths)
    np.testing.assert_array_equal(np.asarray(store.group["truncated"][:]), tokens.truncated)
    assert tokens.truncated.any() and not tokens.truncated.all()  # the fixture exercises the context limit
    for i in [0, 7, 77, N_CELLS - 1]:
        batch = collate(tokens, np.array([i]), loaded.tokenizer.pad_id, loaded.tokenizer.pad_value)
        states = tap_states(loaded.model, batch.to(device), bf16=store.attrs["precision"] == "bfloat16")
        assert sorted(states) == list(range(n_layers + 1))
        for layer, h in states.items():
            genes = h[1:]
            want = {
                "mean": genes.mean(0),
                "max": genes.amax(0),
                "cls": h[0],
                "official": h[0] / h[0].norm(),
            }
            for name, vec in want.items():
                np.testing.assert_allclose(values[name][layer, i], vec.numpy(), rtol=2e-5, atol=2e-5)
    # layers are distinct representations, not copies
    assert not np.allclose(values["mean"][1], values["mean"][-1])


@pytest.mark.slow
def test_cell_vectors_do_not_depend_on_batching(h5ad, ckpt, tmp_path):
    base = read_all(run(h5ad, ckpt, tmp_path / "a.zarr", max_tokens=100_000, limit=60))
    alone = read_all(run(h5ad, ckpt, tmp_path / "b.zarr", max_tokens=1, limit=60))  # one cell per batch
    rechunked = read_all(run(h5ad, ckpt, tmp_path / "c.zarr", max_tokens=700, chunk_cells=17, limit=60))
    for name in base:
        np.testing.assert_allclose(alone[name], base[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rechunked[name], base[name], rtol=1e-5, atol=1e-5)
    head = read_all(run(h5ad, ckpt, tmp_path / "d.zarr", limit=25, chunk_cells=7))
    np.testing.assert_allclose(head["mean"], base["mean"][:, :25], rtol=1e-5, atol=1e-5)


def test_in_memory_anndata_and_float16(adata, ckpt, tmp_path):
    s16 = cs.extract(adata, model="scgpt", checkpoint=ckpt, out=tmp_path / "m.zarr", progress=False, chunk_cells=64)
    assert s16.poolings == ["mean", "cls"]
    x = s16.layers("mean").compute()
    assert x.dtype == np.float16
    s32 = run(adata, ckpt, tmp_path / "m32.zarr", poolings=["mean"], chunk_cells=64)
    np.testing.assert_allclose(x.astype(np.float32), s32.layers("mean").compute(), rtol=2e-3, atol=2e-3)
    ds = s16.to_xarray()
    assert ds["mean"].sizes["layer"] == s16.n_layers + 1


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_triton_backend_store_equals_torch_backend_store(h5ad, ckpt, tmp_path, monkeypatch, dtype):
    """The whole pipeline with the fused kernel (the interpreter on CPU) against the torch path."""
    monkeypatch.setenv("CELLSTRATA_POOL_BACKEND", "torch")
    ref = run(h5ad, ckpt, tmp_path / "torch.zarr", dtype=dtype, limit=48, chunk_cells=20, max_tokens=2000)
    monkeypatch.setenv("CELLSTRATA_POOL_BACKEND", "triton")
    got = run(h5ad, ckpt, tmp_path / "triton.zarr", dtype=dtype, limit=48, chunk_cells=20, max_tokens=2000)
    assert (ref.attrs["pool_backend"], got.attrs["pool_backend"]) == ("torch", "triton")
    a, b = read_all(ref), read_all(got)
    for name in ("max", "cls"):  # no arithmetic: the same float32 value, the same cast
        np.testing.assert_array_equal(b[name], a[name])
    for name in ("mean", "official"):  # float32 sums in another order: float32 rounding, or one float16 step
        assert np.isfinite(b[name]).all()
        diff = np.abs(b[name].astype(np.float64) - a[name].astype(np.float64))
        if dtype == "float16":
            assert (diff <= np.spacing(np.abs(a[name])).astype(np.float64)).all(), name
        else:
            assert (diff <= 1e-5 * np.abs(a[name]) + 1e-6).all(), name


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_float16_overflow_is_reported_per_layer(h5ad, ckpt, tmp_path, monkeypatch, caplog, backend):
    """Layer 2 scaled far beyond float16: counted in the telemetry, named in a warning, float32 keeps it."""
    from cellstrata.engine.models.scgpt import ScGPTModel

    forward = ScGPTModel.forward

    def loud_forward(self, batch, tap):
        forward(self, batch, lambda layer, h: tap(layer, h * 1e6 if layer == 2 else h))

    monkeypatch.setattr(ScGPTModel, "forward", loud_forward)
    monkeypatch.setenv("CELLSTRATA_POOL_BACKEND", backend)
    with caplog.at_level("WARNING", logger="cellstrata"):
        s16 = run(h5ad, ckpt, tmp_path / "s16.zarr", dtype="float16", limit=20, poolings=["mean", "max"])
    tele = s16.attrs["telemetry"]
    mx = s16.layers("max").compute()
    n_inf = int(np.isinf(mx[2]).sum())
    assert n_inf > 0 and not np.isinf(np.delete(mx, 2, axis=0)).any()
    assert tele["overflow_layers"]["layer 2 max"] == n_inf
    assert set(tele["overflow_layers"]) <= {"layer 2 max", "layer 2 mean"}
    assert tele["float16_overflows"] == int(np.isinf(s16.layers("mean").compute()).sum()) + n_inf
    assert "layer 2 max" in caplog.text and "--dtype float32" in caplog.text
    s32 = run(h5ad, ckpt, tmp_path / "s32.zarr", dtype="float32", limit=20, poolings=["mean", "max"])
    assert s32.attrs["telemetry"]["float16_overflows"] == 0 and np.isfinite(s32.layers("max").compute()).all()


def test_custom_pooling_of_its_own_width(h5ad, ckpt, tmp_path, monkeypatch):
    """A family's custom pooling (here: mean and max side by side, 2H wide) lands in its own array."""
    from cellstrata.engine.models.scgpt import ScGPTFamily
    from cellstrata.kernels import PoolSpec, pool_cast

    class MeanMax:
        width = 128  # 2 x hidden of the tiny preset

        def __call__(self, hidden, lengths, out, overflow, backend, *, starts=None):
            h = hidden.shape[-1]
            view = out.unflatten(-1, (2, h)).transpose(0, 1)  # [2, B, H] strided view of [B, 2H]
            ovf = torch.zeros(2, dtype=torch.int64, device=hidden.device)
            pool_cast(
                hidden, starts, lengths, PoolSpec(("mean", "max"), n_leading=1), out.dtype, view, ovf, backend=backend
            )
            if overflow is not None:
                overflow += ovf.sum()

    load = ScGPTFamily.load

    def load_with_custom(self, *a, **kw):
        loaded = load(self, *a, **kw)
        loaded.custom_poolings = {"meanmax": MeanMax()}
        return loaded

    monkeypatch.setattr(ScGPTFamily, "load", load_with_custom)
    store = run(h5ad, ckpt, tmp_path / "c.zarr", poolings=["max", "meanmax", "mean"], limit=40)
    assert store.poolings == ["max", "meanmax", "mean"]
    both, mean, mx = (store.layers(p).compute() for p in ("meanmax", "mean", "max"))
    assert both.shape == (mean.shape[0], 40, 128)
    np.testing.assert_array_equal(both[:, :, :64], mean)
    np.testing.assert_array_equal(both[:, :, 64:], mx)
    ds = store.to_xarray()
    assert ds["meanmax"].dims == ("layer", "cell", "feature_meanmax") and ds["mean"].dims[-1] == "feature"
    assert store.attrs["pool_ops"]["meanmax"] == "custom"


def test_rerun_resumes_and_other_config_is_refused(h5ad, ckpt, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    args = ["extract", str(h5ad), "--model", "scgpt", "--checkpoint", str(ckpt), "--out", str(out), "--quiet"]
    assert main([*args, "--chunk-cells", "32"]) == 0
    before = read_all(cs.open_store(out))
    # knock out two committed chunks: the re-run writes exactly those again
    zarr.open_group(str(out), mode="r+")["done"][1:3] = np.zeros(2, dtype=np.uint8)
    assert main([*args, "--chunk-cells", "32"]) == 0
    assert "resuming" in capsys.readouterr().err
    after = read_all(cs.open_store(out))
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    resumed = cs.open_store(out).attrs["telemetry"]
    assert resumed["cells"] == 64  # the two chunks written again
    # a re-run with nothing left to do keeps the last real run's telemetry
    assert main([*args, "--chunk-cells", "32"]) == 0
    assert cs.open_store(out).attrs["telemetry"] == resumed
    capsys.readouterr()
    assert main([*args, "--chunk-cells", "32", "--pool", "max"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cellstrata: error:") and "--overwrite" in err and "\n" not in err
    assert main([*args, "--chunk-cells", "32", "--pool", "max", "--overwrite"]) == 0
    assert cs.open_store(out).poolings == ["max"]


@pytest.mark.slow
def test_write_failure_mid_run_then_resume(h5ad, ckpt, tmp_path, monkeypatch):
    ref = read_all(run(h5ad, ckpt, tmp_path / "ref.zarr", dtype="float16"))
    real = writer_mod.write_chunk

    def fail_on_third(path, chunk):
        if chunk.index == 2:
            raise OSError(28, "No space left on device")
        return real(path, chunk)

    monkeypatch.setattr(writer_mod, "write_chunk", fail_on_third)
    with pytest.raises(WriteError, match="disk is full"):
        run(h5ad, ckpt, tmp_path / "s.zarr", dtype="float16")
    done = np.asarray(zarr.open_group(str(tmp_path / "s.zarr"))["done"][:])
    assert done[:2].all() and done[2] == 0
    monkeypatch.setattr(writer_mod, "write_chunk", real)
    resumed = read_all(run(h5ad, ckpt, tmp_path / "s.zarr", dtype="float16"))
    for name in ref:
        np.testing.assert_array_equal(resumed[name], ref[name])


@pytest.fixture(scope="module")
def kill_case(tmp_path_factory, ckpt):
    """800 cells in 40 chunks and the store of an uninterrupted run of the same command."""
    root = tmp_path_factory.mktemp("kill")
    data = root / "cells.h5ad"
    synthetic_dataset(800, 2000, seed=11, genes_per_cell=100).write_h5ad(data)
    common = [
        "extract",
        str(data),
        "--model",
        "scgpt",
        "--checkpoint",
        str(ckpt),
        "--pool",
        "all",
        "--chunk-cells",
        "20",
        "--max-tokens",
        "2048",
        "--quiet",
    ]
    assert main([*common, "--out", str(root / "ref.zarr")]) == 0
    return common, root / "ref.zarr"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["SIGKILL", "SIGINT", "SIGTERM"])
def test_killed_run_resumes_to_identical_store(tmp_path, kill_case, sig):
    common, ref = kill_case
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "cellstrata", *common, "--out", str(out)]
    # cwd: the installed package, not a same-named folder of the working directory (python -m puts it first)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if np.asarray(zarr.open_group(str(out), mode="r")["done"][:]).sum() >= 3:
                break
        except Exception:  # the store does not exist yet
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    if sig != signal.SIGKILL:  # a graceful stop: in-flight chunks commit, exit status 128 + signal
        assert proc.returncode == 128 + sig and "re-run the same command" in err and "Traceback" not in err, err
    else:
        assert proc.returncode == -signal.SIGKILL
    partial = cs.open_store(out)
    assert not partial.is_complete and partial.done.sum() >= 3
    assert main([*common, "--out", str(out)]) == 0
    a, b = read_all(cs.open_store(out)), read_all(cs.open_store(ref))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_array_equal(cs.open_store(out).obs_names(), cs.open_store(ref).obs_names())


# ---------------------------------------------------------------------------------------------- bad input


def cli_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("cellstrata: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_variant(tmp_path, adata, name, *, X=None, var_names=None) -> Path:
    a = adata.copy()
    if X is not None:
        a.X = X
    if var_names is not None:
        a.var_names = var_names
    path = tmp_path / f"{name}.h5ad"
    a.write_h5ad(path)
    return path


def extract_args(path, ckpt, tmp_path, *extra):
    return [
        "extract",
        str(path),
        "--model",
        "scgpt",
        "--checkpoint",
        str(ckpt),
        "--out",
        str(tmp_path / "bad.zarr"),
        "--quiet",
        *extra,
    ]


def test_no_gene_overlap(capsys, tmp_path, adata, ckpt):
    path = write_variant(tmp_path, adata, "ens", var_names=[f"ENSG{i:011d}" for i in range(adata.n_vars)])
    msg = cli_error(capsys, extract_args(path, ckpt, tmp_path))
    assert f"0 of {adata.n_vars}" in msg and "--gene-column" in msg


def test_negative_and_nan_values(capsys, tmp_path, adata, ckpt):
    X = sp.csr_matrix(adata.X, copy=True)
    X.data[5] = -1.0
    msg = cli_error(capsys, extract_args(write_variant(tmp_path, adata, "neg", X=X), ckpt, tmp_path))
    assert "negative" in msg.lower()
    X = sp.csr_matrix(adata.X, copy=True)
    X.data[9] = np.nan
    msg = cli_error(capsys, extract_args(write_variant(tmp_path, adata, "nan", X=X), ckpt, tmp_path))
    assert "nan" in msg.lower()


def test_normalised_matrix_is_refused_unless_allowed(capsys, tmp_path, adata, ckpt):
    X = sp.csr_matrix(adata.X, dtype=np.float32, copy=True)
    X.data = np.log1p(X.data / 3.0)
    path = write_variant(tmp_path, adata, "log", X=X)
    msg = cli_error(capsys, extract_args(path, ckpt, tmp_path))
    assert "counts" in msg and "--allow-noncounts" in msg
    assert main(extract_args(path, ckpt, tmp_path, "--allow-noncounts", "--limit", "20")) == 0


def test_unreadable_file(capsys, tmp_path, ckpt):
    bad = tmp_path / "junk.h5ad"
    bad.write_bytes(b"this is not hdf5")
    cli_error(capsys, extract_args(bad, ckpt, tmp_path))
    cli_error(capsys, extract_args(tmp_path / "missing.h5ad", ckpt, tmp_path))


def test_empty_cells_nan_by_default_error_on_request(capsys, tmp_path, adata, ckpt):
    X = sp.lil_matrix(adata.X)
    X[3, :] = 0
    X[10, :] = 0
    path = write_variant(tmp_path, adata, "empty", X=sp.csr_matrix(X))
    store = run(path, ckpt, tmp_path / "e.zarr", poolings=["mean", "cls"])
    mean = store.layers("mean").compute()
    assert np.isnan(mean[:, [3, 10]]).all() and np.isfinite(mean[:, [0, 4, 11]]).all()
    assert np.asarray(store.group["n_tokens"][:])[[3, 10]].tolist() == [0, 0]
    assert store.attrs["telemetry"]["empty_cells"] == 2
    msg = cli_error(capsys, extract_args(path, ckpt, tmp_path, "--empty-cells", "error"))
    assert "no expressed gene" in msg


def test_missing_checkpoint_and_bad_options(capsys, tmp_path, h5ad, ckpt):
    cli_error(capsys, ["extract", str(h5ad), "--model", "scgpt", "--out", str(tmp_path / "x.zarr")])
    cli_error(capsys, ["extract", str(h5ad), "--model", "nope", "--checkpoint", str(ckpt), "--out", "x"])
    cli_error(capsys, extract_args(h5ad, ckpt, tmp_path, "--pool", "median"))
    cli_error(capsys, ["info", str(tmp_path / "nothing.zarr")])


def test_info_and_init_checkpoint_commands(capsys, tmp_path, h5ad):
    ck = tmp_path / "ck"
    assert main(["init-checkpoint", "--model", "scgpt", "--preset", "tiny", "--out", str(ck)]) == 0
    assert "RANDOM" in capsys.readouterr().out
    assert {p.name for p in ck.iterdir()} >= {"best_model.pt", "args.json", "vocab.json"}
    out = tmp_path / "s.zarr"
    argv = ["extract", str(h5ad), "--model", "scgpt", "--checkpoint", str(ck), "--out", str(out), "--limit", "30"]
    assert main([*argv, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "scgpt" in text and "complete" in text and "30" in text


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--cells", "120", "--quiet", "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM" in out and "complete" in out
    store = cs.open_store(tmp_path / "demo" / "demo.zarr")
    assert store.is_complete and set(store.poolings) == {"mean", "max", "cls", "official"}


@pytest.mark.parametrize(
    ("model", "poolings"),
    [
        ("tahoe-x1", {"mean", "max", "cls", "official"}),
        ("scfoundation", {"mean", "max", "s_token", "t_token", "official"}),
        ("geneformer", {"mean", "max", "cls", "official"}),
    ],
)
def test_demo_runs_every_family(tmp_path, capsys, model, poolings):
    args = ["demo", "--model", model, "--out", str(tmp_path / "demo"), "--cells", "60", "--quiet", "--no-probe"]
    assert main(args) == 0
    assert "RANDOM" in capsys.readouterr().out
    store = cs.open_store(tmp_path / "demo" / f"demo-{model}.zarr")
    assert store.is_complete and set(store.poolings) == poolings
    assert store.attrs["model"]["family"] == model and store.attrs["official_layer"] is not None
    mean = store.layers("mean").compute()
    assert np.isfinite(mean).mean() > 0.9  # the demo's cells map to every tiny vocabulary
