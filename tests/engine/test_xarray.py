"""Labelled arrays: ``layer``, ``depth`` and ``cell`` coordinates from ``to_xarray`` and plain ``xarray.open_zarr``
(store format 2), without a warning; format 1 stores still read, verify, export and resume as format 1."""

from __future__ import annotations

import json
import runpy
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from cellstrata.cli import main
from cellstrata.engine.storage.checksums import part_names
from cellstrata.engine.storage.location import StoreLocation
from cellstrata.engine.storage.store import (
    FORMAT_VERSION,
    StoreSpec,
    config_hash,
    create_or_resume,
    open_store,
    store_attributes,
    update_attrs,
)
from cellstrata.engine.storage.verify import verify_store
from cellstrata.engine.storage.writer import ChunkData, write_chunk

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "xarray_layers.py"
H = 5
WIDTHS = {"mean": H, "official": 2 * H}  # a pooling of its own width: dimension feature_official


def random_names(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unique cell names of random lengths, some non-ASCII."""
    letters = np.array(list("ACGTé_"))
    names = {"".join(rng.choice(letters, size=rng.integers(3, 14))) + f"-{i}" for i in range(n)}
    return rng.permutation(np.array(sorted(names)))


def make_spec(n: int, n_layers: int, c: int, *, version: int = FORMAT_VERSION, widths=WIDTHS) -> StoreSpec:
    attrs = {
        "format_version": version,
        "model": {"family": "scgpt", "preset": "tiny", "n_layers": n_layers, "hidden": H},
        "poolings": list(widths),
        "dtype": "float32",
        "chunk_cells": c,
        "n_cells": n,
        "source": {"path": "x.h5ad", "n_cells": n, "n_genes": 10},
        "config_hash": config_hash({"n": n, "layers": n_layers, "c": c}),  # the same for both formats
    }
    return StoreSpec(n, n_layers, H, dict(widths), "float32", c, "zstd", attrs)


def chunks_of(spec: StoreSpec, names: np.ndarray, rng: np.random.Generator) -> list[ChunkData]:
    out = []
    for c in range(spec.n_chunks):
        start, stop = spec.chunk_bounds(c)
        k = stop - start
        pooled = {p: rng.standard_normal((spec.n_layers + 1, k, w)).astype(np.float32) for p, w in spec.widths.items()}
        out.append(
            ChunkData(
                c, start, stop, pooled, names[start:stop], rng.integers(1, 99, k, dtype=np.int32), rng.random(k) < 0.3
            )
        )
    return out


def build(
    path: Path, rng: np.random.Generator, *, version: int = FORMAT_VERSION, n_layers: int | None = None, widths=WIDTHS
):
    """A complete store of odd sizes; returns (spec, names, {pooling: [L+1, N, W]})."""
    n, c = int(rng.integers(20, 40)), int(rng.integers(4, 9))
    spec = make_spec(n, n_layers or int(rng.integers(2, 6)), c, version=version, widths=widths)
    names = random_names(rng, n)
    create_or_resume(path, spec)
    chunks = chunks_of(spec, names, rng)
    for ch in chunks:
        write_chunk(str(path), ch)
    data = {p: np.concatenate([ch.pooled[p] for ch in chunks], axis=1) for p in spec.widths}
    return spec, names, data


def files(path: Path) -> set[str]:
    return {str(f.relative_to(path)) for f in path.rglob("zarr.json")}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


def test_fresh_store_is_labelled_by_to_xarray_and_plain_xarray_without_a_warning(tmp_path, rng):
    path = tmp_path / "s.zarr"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec, names, data = build(path, rng)
        store = open_store(path)
        ds = store.to_xarray()
        pooled = xr.open_zarr(str(path), group="pooled")
        cells = xr.open_zarr(str(path))
        ds.load(), pooled.load(), cells.load()
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    n_layers = spec.n_layers
    layers = np.arange(n_layers + 1)
    for got in (ds, pooled):
        assert got["layer"].values.tolist() == layers.tolist()
        np.testing.assert_array_equal(got["depth"].values, layers / n_layers)
        assert got["cell"].values.tolist() == names.tolist()
        assert set(got.indexes) == {"layer", "cell"} and "depth" in got.coords
        assert got["mean"].dims == ("layer", "cell", "feature") and got["official"].dims[-1] == "feature_official"
        for p, values in data.items():
            np.testing.assert_array_equal(got[p].values, values)
    assert "block" in pooled["layer"].attrs["description"] and "layer / L" in pooled["depth"].attrs["description"]
    assert cells["cell"].values.tolist() == names.tolist() and "cell" in cells.indexes
    np.testing.assert_array_equal(cells["n_tokens"].values, ds["n_tokens"].values)
    assert ds["committed"].values.all() and ds.attrs["cellstrata"]
    # a cell by name and a layer by label, then by relative depth
    i, layer = int(rng.integers(len(names))), int(rng.integers(n_layers + 1))
    np.testing.assert_array_equal(pooled["mean"].sel(layer=layer, cell=names[i]).values, data["mean"][layer, i])
    last = ds["official"].sel(layer=ds.depth == 1).squeeze("layer")
    np.testing.assert_array_equal(last.values, data["official"][n_layers])


def test_the_coordinates_follow_the_contract(tmp_path, rng):
    path = tmp_path / "s.zarr"
    build(path, rng)
    nodes = {"cell/zarr.json", "pooled/cell/zarr.json", "pooled/layer/zarr.json", "pooled/depth/zarr.json"}
    assert nodes <= files(path)
    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    assert group["pooled"].attrs["coordinates"] == "depth"
    assert group["pooled/layer"].dtype == np.int64 and group["pooled/depth"].dtype == np.float64
    assert group["cell"].metadata.dimension_names == ("cell",) == group["pooled/cell"].metadata.dimension_names
    assert list(group["checksum"].attrs["parts"])[-5:] == ["obs_names", "n_tokens", "truncated", "cell", "pooled/cell"]
    # the root's consolidated metadata lists the data nodes only, as they are on disk
    root = json.loads((path / "zarr.json").read_text())
    listed = root["consolidated_metadata"]["metadata"]
    assert not any(k.startswith(("probes", "metadata_backup", "lease")) for k in listed)
    for node in ("pooled/mean", "pooled/cell", "cell", "obs_names", "done", "checksum"):
        assert listed[node] == json.loads((path / node / "zarr.json").read_text())


def test_attribute_updates_and_a_restored_root_keep_xarray_quiet(tmp_path, rng):
    path = tmp_path / "s.zarr"
    build(path, rng)
    update_attrs(StoreLocation.of(path).open_group("r+"), complete=True)  # zarr drops the index; it is written again
    (path / "zarr.json").write_bytes((path / "zarr.json").read_bytes()[:50])  # a cut root zarr.json
    assert main(["info", str(path), "--verify", "--repair", "--quiet"]) == 3  # restored from the backup
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pooled = xr.open_zarr(str(path), group="pooled")
    assert not caught and open_store(path).attrs["complete"] is True and "cell" in pooled.indexes
    assert verify_store(path).is_clean


def test_verify_finds_a_changed_cell_coordinate_and_layer_values(tmp_path, rng):
    path = tmp_path / "s.zarr"
    build(path, rng)
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    group["pooled/cell"][0:2] = np.array(["evil0", "evil1"])
    report = verify_store(path)
    assert [d.index for d in report.damaged_chunks] == [0] and report.damaged_chunks[0].parts == {
        "pooled/cell": "changed"
    }
    group["pooled/layer"][0:1] = np.array([5])
    report = verify_store(path)
    assert any("pooled/layer holds" in s for s in report.structure)


def test_config_hash_is_unchanged_by_the_format(rng):
    kw = {
        "model": {"family": "scgpt", "n_layers": int(rng.integers(2, 30)), "checkpoint": "/x"},
        "tokenizer": {"max_length": int(rng.integers(100, 3000))},
        "pool_ops": {"mean": "mean"},
        "layout": [1, 2],
        "dtype": "float16",
        "precision": "float32",
        "chunk_cells": 64,
        "n_cells": 100,
        "empty_cells": "nan",
        "source": {"path": "a.h5ad", "obs_names_sha256": "ab"},
    }
    attrs = store_attributes(**kw, official_layer=None, pool_backend="torch", gene_overlap={}, engine_version="x")
    format_1 = {  # what every store written before format 2 hashed
        "format_version": 1,
        "model": {"family": "scgpt", "n_layers": kw["model"]["n_layers"]},
        "tokenizer": kw["tokenizer"],
        "poolings": kw["pool_ops"],
        "layout": [1, 2],
        "dtype": "float16",
        "precision": "float32",
        "chunk_cells": 64,
        "n_cells": 100,
        "empty_cells": "nan",
        "source": {"obs_names_sha256": "ab"},
    }
    assert attrs["format_version"] == FORMAT_VERSION == 2 and attrs["config_hash"] == config_hash(format_1)


def test_a_format_1_store_reads_verifies_exports_and_resumes_as_format_1(tmp_path, rng):
    path = tmp_path / "old.zarr"
    n, n_layers, c = 29, 3, 6
    spec = make_spec(n, n_layers, c, version=1)
    names = random_names(rng, n)
    create_or_resume(path, spec)
    chunks = chunks_of(spec, names, rng)
    for ch in chunks[:-1]:
        write_chunk(str(path), ch)
    # the layout of format 1, exactly: no coordinates, no consolidated metadata
    v1_nodes = {"zarr.json", "pooled/zarr.json", "pooled/mean/zarr.json", "pooled/official/zarr.json"}
    v1_nodes |= {
        f"{a}/zarr.json" for a in ("obs_names", "n_tokens", "truncated", "done", "checksum", "metadata_backup")
    }
    assert files(path) == v1_nodes
    assert not json.loads((path / "zarr.json").read_text()).get("consolidated_metadata")
    parts = zarr.open_group(str(path), mode="r")["checksum"].attrs["parts"]
    assert parts == part_names(list(WIDTHS), n_layers, format_version=1)
    # resumed by a spec of this version (same config hash): it stays format 1
    group, resumed = create_or_resume(path, make_spec(n, n_layers, c))
    assert resumed and group.attrs["cellstrata"]["format_version"] == 1
    write_chunk(str(path), chunks[-1])
    update_attrs(group, complete=True)
    assert files(path) == v1_nodes and not json.loads((path / "zarr.json").read_text()).get("consolidated_metadata")
    data = {p: np.concatenate([ch.pooled[p] for ch in chunks], axis=1) for p in WIDTHS}
    # reads, labelled by to_xarray
    store = open_store(path)
    assert store.format_version == 1 and store.complete
    ds = store.to_xarray()
    assert ds["cell"].values.tolist() == names.tolist() and ds["layer"].values.tolist() == list(range(n_layers + 1))
    np.testing.assert_array_equal(ds["depth"].values, np.arange(n_layers + 1) / n_layers)
    np.testing.assert_array_equal(ds["official"].sel(cell=names[7]).values, data["official"][:, 7])
    # verifies, and damage is still found
    assert verify_store(path).ok == spec.n_chunks and main(["info", str(path), "--verify", "--quiet"]) == 0
    zarr.open_group(str(path), mode="r+")["obs_names"][0:1] = np.array(["evil"])
    assert verify_store(path).damaged_chunks[0].parts == {"obs_names": "changed"}
    zarr.open_group(str(path), mode="r+")["obs_names"][0:1] = names[0:1]
    # exports, matched by name
    order = rng.permutation(n)
    adata = ad.AnnData(np.zeros((n, 1), dtype=np.float32), obs=pd.DataFrame(index=names[order]))
    store.to_anndata(adata, layers=[n_layers], pooling="mean")
    np.testing.assert_array_equal(adata.obsm[f"X_scgpt_L{n_layers}"], data["mean"][n_layers][order])
    assert adata.uns["cellstrata"]["X_scgpt"]["format_version"] == 1


def test_an_unknown_format_is_refused_in_one_line(tmp_path, rng):
    path = tmp_path / "s.zarr"
    build(path, rng)
    group = StoreLocation.of(path).open_group("r+")
    group.attrs["cellstrata"] = {**dict(group.attrs["cellstrata"]), "format_version": 3}
    with pytest.raises(Exception, match="store format 3; this cellstrata reads formats 1, 2: upgrade cellstrata"):
        open_store(path)


def test_readme_example_runs(tmp_path, monkeypatch, rng):
    """docs/examples/xarray_layers.py, as the README shows it, on a store named as the README names it."""
    monkeypatch.chdir(tmp_path)
    n_layers = int(rng.integers(7, 10))  # the example reads layer 7
    _, names, data = build(tmp_path / "atlas.scgpt.zarr", rng, n_layers=n_layers, widths={"cls": H, "mean": H})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert not caught, [str(w.message) for w in caught]
    assert out["cell"] == names[0]
    np.testing.assert_array_equal(out["x"], data["cls"][7, 0])
    np.testing.assert_array_equal(out["same"], out["x"])
    np.testing.assert_array_equal(out["deepest"].values, data["cls"][n_layers])
