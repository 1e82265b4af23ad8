"""Row-block reading of AnnData inputs: every layout and format, fingerprints, pickling, errors, value checks."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellstrata.engine.errors import (
    InputError,
    InvalidValuesError,
    NotCountsError,
    UnreadableInputError,
)
from cellstrata.engine.input.sources import CellBlock, CellSource, SlowInputWarning, check_values, open_source

N_CELLS, N_GENES, N_RAW_GENES = 53, 17, 21
BLOCK = 7  # odd, does not divide N_CELLS


def _counts(rng: np.random.Generator, n: int, g: int) -> sp.csr_matrix:
    X = sp.random(n, g, density=0.3, format="csr", random_state=rng, dtype=np.float64)
    X.data = np.ceil(X.data * 20)
    X = sp.csr_matrix(sp.diags((np.arange(n) != 5).astype(np.float64)) @ X)  # cell 5 is empty
    X.eliminate_zeros()
    return sp.csr_matrix(X.astype(np.float32))


def _make_adata(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = _counts(rng, N_CELLS, N_GENES)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(["a", "b"], N_CELLS)), "score": rng.random(N_CELLS)},
        index=[f"cell_{i}" for i in range(N_CELLS)],
    )
    var = pd.DataFrame({"symbol": [f"SYM{i}" for i in range(N_GENES)]}, index=[f"ENSG{i:03d}" for i in range(N_GENES)])
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = sp.csr_matrix(X.astype(np.int32))
    lognorm = X.toarray().astype(np.float64)
    adata.layers["lognorm"] = np.log1p(lognorm)
    raw_X = _counts(rng, N_CELLS, N_RAW_GENES)
    raw_var = pd.DataFrame(
        {"symbol": [f"RAWSYM{i}" for i in range(N_RAW_GENES)]}, index=[f"RAW{i:03d}" for i in range(N_RAW_GENES)]
    )
    adata.raw = ad.AnnData(X=raw_X, obs=obs[[]], var=raw_var)
    return adata


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return _make_adata()


def _expected(adata: ad.AnnData, layer: str | None) -> np.ndarray:
    if layer is None:
        M = adata.X
    elif layer == "raw":
        M = adata.raw.X
    else:
        M = adata.layers[layer]
    return M.toarray() if sp.issparse(M) else np.asarray(M)


def _write(adata: ad.AnnData, path: Path, kind: str) -> Path:
    a = adata.copy()
    if kind == "h5ad-dense":
        a.X = a.X.toarray()
    elif kind == "h5ad-csc":
        a.X = sp.csc_matrix(a.X)
    if kind.startswith("h5ad"):
        a.write_h5ad(path)
        return path
    old = ad.settings.zarr_write_format
    ad.settings.zarr_write_format = 3 if kind == "zarr3" else 2
    try:
        a.write_zarr(path)
    finally:
        ad.settings.zarr_write_format = old
    return path


KINDS = ["h5ad-csr", "h5ad-dense", "h5ad-csc", "zarr2", "zarr3"]


@pytest.fixture(scope="module")
def files(adata: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's zarr v3 experimental warnings
        return {k: _write(adata, root / (f"{k}.zarr" if k.startswith("zarr") else f"{k}.h5ad"), k) for k in KINDS}


def _stack(source: CellSource, block_size: int = BLOCK) -> np.ndarray:
    blocks = list(source.iter_blocks(block_size))
    assert [len(b) for b in blocks[:-1]] == [block_size] * (len(blocks) - 1)
    np.testing.assert_array_equal(np.concatenate([b.indices for b in blocks]), np.arange(source.n_cells))
    for b in blocks:
        assert isinstance(b.X, sp.csr_matrix)
        assert b.X.dtype in (np.float32, np.float64)
        assert b.X.shape == (len(b), source.n_genes)
    return sp.vstack([b.X for b in blocks]).toarray()


# --------------------------------------------------------------------------------------------------
# Reading every layout
# --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::cellstrata.engine.input.sources.SlowInputWarning")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", [None, "counts", "lognorm", "raw"])
def test_blocks_reassemble_the_matrix(files, adata, kind, layer):
    with open_source(files[kind], layer=layer) as src:
        assert (src.n_cells, src.layer) == (N_CELLS, layer)
        assert src.format == ("zarr" if kind.startswith("zarr") else "h5ad")
        assert src.layers == ("counts", "lognorm", "raw")
        np.testing.assert_array_equal(_stack(src), _expected(adata, layer))
        genes = adata.raw.var_names if layer == "raw" else adata.var_names
        np.testing.assert_array_equal(src.gene_names, np.asarray(genes))
        np.testing.assert_array_equal(src.obs_names, np.asarray(adata.obs_names))
        assert src.path == str(files[kind].resolve())
        assert src.dtype == (np.float64 if layer == "lognorm" else np.float32)


def test_storage_is_reported(files):
    assert open_source(files["h5ad-csr"]).storage == "csr"
    assert open_source(files["h5ad-dense"]).storage == "dense"
    with pytest.warns(SlowInputWarning, match="CSC"):
        assert open_source(files["h5ad-csc"]).storage == "csc"


@pytest.mark.filterwarnings("ignore::cellstrata.engine.input.sources.SlowInputWarning")
def test_csc_reads_in_bounded_windows(files, adata, monkeypatch):
    import cellstrata.engine.input.sources as sources

    monkeypatch.setattr(sources, "_CSC_WINDOW_NNZ", 11)  # many windows and column pieces
    src = open_source(files["h5ad-csc"])
    np.testing.assert_array_equal(_stack(src, 3), _expected(adata, None))
    np.testing.assert_array_equal(src.read(40, 45).X.toarray(), _expected(adata, None)[40:45])
    np.testing.assert_array_equal(src.read(2, 9).X.toarray(), _expected(adata, None)[2:9])


@pytest.mark.parametrize("kind", ["dense", "csr", "csc", "int", "float64"])
def test_in_memory(adata, kind):
    a = adata.copy()
    expected = _expected(adata, None)
    if kind == "dense":
        a.X = a.X.toarray()
    elif kind == "csc":
        a.X = sp.csc_matrix(a.X)
    elif kind == "int":
        a.X = a.X.astype(np.int64)
    elif kind == "float64":
        a.X = a.X.astype(np.float64)
    src = open_source(a)
    assert src.path is None and src.format == "memory"
    np.testing.assert_array_equal(_stack(src), expected)
    assert src.dtype == (np.float64 if kind == "float64" else np.float32)
    np.testing.assert_array_equal(_stack(open_source(a, layer="raw")), _expected(adata, "raw"))
    np.testing.assert_array_equal(_stack(open_source(a, layer="counts")), _expected(adata, "counts"))


def test_in_memory_backed(files, adata):
    backed = ad.read_h5ad(files["h5ad-csr"], backed="r")
    try:
        src = open_source(backed)
        np.testing.assert_array_equal(_stack(src), _expected(adata, None))
        assert src.path == str(files["h5ad-csr"].resolve())
        np.testing.assert_array_equal(_stack(open_source(backed, layer="counts")), _expected(adata, "counts"))
        with pytest.raises(InputError, match="view of a backed AnnData"):
            open_source(backed[3:9])
    finally:
        backed.file.close()


def test_partial_ranges(files, adata):
    src = open_source(files["zarr3"])
    blocks = list(src.iter_blocks(4, start=9, stop=20))
    assert blocks[0].indices.tolist() == [9, 10, 11, 12]
    np.testing.assert_array_equal(sp.vstack([b.X for b in blocks]).toarray(), _expected(adata, None)[9:20])
    empty = src.read(7, 7)
    assert len(empty) == 0 and empty.X.shape == (0, N_GENES)
    for bad in [(-1, 3), (5, 2), (0, N_CELLS + 1)]:
        with pytest.raises(ValueError):
            src.read(*bad)
    with pytest.raises(ValueError):
        next(src.iter_blocks(0))


def test_block_metadata(files):
    block = open_source(files["h5ad-csr"], layer="lognorm").read(0, 3)
    assert block.layer == "lognorm" and block.layers == ("counts", "lognorm", "raw")
    assert len(CellBlock(np.arange(2), sp.csr_matrix((2, 3)))) == 2  # the two-field form still works


@pytest.mark.parametrize("kind", ["h5ad-csr", "zarr2"])
def test_gene_column(files, adata, kind):
    src = open_source(files[kind], gene_column="symbol")
    np.testing.assert_array_equal(src.gene_names, adata.var["symbol"].to_numpy())
    raw = open_source(files[kind], layer="raw", gene_column="symbol")
    np.testing.assert_array_equal(raw.gene_names, adata.raw.var["symbol"].to_numpy())
    with pytest.raises(InputError, match=r"gene column 'nope' not found.*available columns: symbol") as err:
        open_source(files[kind], gene_column="nope")
    assert "\n" not in str(err.value)
    mem = open_source(adata, gene_column="symbol")
    np.testing.assert_array_equal(mem.gene_names, adata.var["symbol"].to_numpy())
    with pytest.raises(InputError, match="available columns: symbol"):
        open_source(adata, gene_column="nope")


def test_read_obs(files, adata):
    for src in (open_source(files["h5ad-csr"]), open_source(files["zarr3"]), open_source(adata)):
        obs = src.read_obs(["batch", "score"])
        np.testing.assert_array_equal(obs.index, adata.obs_names)
        np.testing.assert_array_equal(obs["batch"].astype(str), adata.obs["batch"].astype(str))
        with pytest.raises(InputError, match="available: batch, score"):
            src.read_obs(["missing"])


# --------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------


def test_fingerprint(files, adata, tmp_path):
    fp = open_source(files["h5ad-csr"]).fingerprint()
    assert fp == open_source(files["h5ad-csr"]).fingerprint()  # deterministic
    assert set(fp) == {"path", "n_cells", "n_genes", "layer", "gene_column", "obs_names_sha256", "gene_names_sha256"}
    same = {k: v for k, v in open_source(files["zarr3"]).fingerprint().items() if k != "path"}
    assert same == {k: v for k, v in fp.items() if k != "path"}
    mem = open_source(adata).fingerprint()
    assert mem["path"] is None and mem["obs_names_sha256"] == fp["obs_names_sha256"]

    renamed = adata.copy()
    renamed.obs_names = [f"other_{i}" for i in range(N_CELLS)]
    assert open_source(renamed).fingerprint()["obs_names_sha256"] != fp["obs_names_sha256"]
    regened = adata.copy()
    regened.var_names = [f"G{i}" for i in range(N_GENES)]
    changed = open_source(regened).fingerprint()
    assert changed["gene_names_sha256"] != fp["gene_names_sha256"]
    assert changed["obs_names_sha256"] == fp["obs_names_sha256"]
    assert open_source(adata[:-1].copy()).fingerprint()["obs_names_sha256"] != fp["obs_names_sha256"]
    assert open_source(files["h5ad-csr"], layer="raw").fingerprint()["layer"] == "raw"
    by_symbol = open_source(files["h5ad-csr"], gene_column="symbol").fingerprint()
    assert by_symbol["gene_names_sha256"] != fp["gene_names_sha256"]


# --------------------------------------------------------------------------------------------------
# Laziness and pickling
# --------------------------------------------------------------------------------------------------


def test_backed_reads_only_row_slices(files, adata, monkeypatch):
    """Only row slices of X are read: indptr windows and the data/indices ranges they point at."""
    calls: list[tuple[str, object]] = []
    original = h5py.Dataset.__getitem__

    def recording(self, key, *args, **kwargs):
        calls.append((self.name, key))
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    src = open_source(files["h5ad-csr"])
    _stack(src)
    nnz = adata.X.nnz
    max_block_nnz = max(adata.X[s : s + BLOCK].nnz for s in range(0, N_CELLS, BLOCK))
    x_calls = [(name, key) for name, key in calls if name.startswith("/X/")]
    assert {name for name, _ in x_calls} == {"/X/indptr", "/X/data", "/X/indices"}
    for name, key in x_calls:
        if isinstance(key, slice):
            assert key.step is None and key.start is not None and key.stop is not None
            limit = BLOCK + 1 if name == "/X/indptr" else max_block_nnz
            assert key.stop - key.start <= limit, (name, key)
        else:
            assert name == "/X/indptr" and np.ndim(key) == 0, (name, key)  # the one-element nnz check
    assert sum(key.stop - key.start for name, key in x_calls if name == "/X/data" and isinstance(key, slice)) == nnz
    assert not any(name.startswith("/layers/") or name.startswith("/raw/X") for name, _ in calls)


@pytest.mark.parametrize("kind", ["h5ad-csr", "zarr2", "zarr3", "memory"])
def test_pickle_and_reopen(files, adata, kind):
    src = open_source(adata if kind == "memory" else files[kind], layer="counts")
    first = src.read(10, 30)
    copy = pickle.loads(pickle.dumps(src))
    if kind != "memory":
        assert copy._root is None and copy._matrix is None
    assert (copy.n_cells, copy.n_genes, copy.layer, copy.layers) == (src.n_cells, src.n_genes, "counts", src.layers)
    np.testing.assert_array_equal(copy.read(10, 30).X.toarray(), first.X.toarray())
    assert copy.fingerprint() == src.fingerprint()
    np.testing.assert_array_equal(_stack(copy), _expected(adata, "counts"))
    src.close()
    np.testing.assert_array_equal(src.read(0, 5).X.toarray(), _expected(adata, "counts")[:5])  # reopens
    src.close()
    copy.close()


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def _one_line_error(cls: type[Exception], data: object, **kwargs: object) -> str:
    with pytest.raises(cls) as err:
        src = open_source(data, **kwargs)
        list(src.iter_blocks(BLOCK))
    message = str(err.value)
    assert "\n" not in message and message
    return message


def test_missing_path(tmp_path):
    msg = _one_line_error(UnreadableInputError, tmp_path / "nope.h5ad")
    assert "not found" in msg and "nope.h5ad" in msg


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        ("random.h5ad", np.random.default_rng(0).bytes(4096), "not an HDF5 file"),
        ("table.csv", b"cell,g1,g2\nc1,1,2\nc2,0,3\n", "not an HDF5 file"),
        ("empty.h5ad", b"", "not an HDF5 file"),
    ],
)
def test_not_anndata_bytes(tmp_path, name, content, expect):
    path = tmp_path / name
    path.write_bytes(content)
    msg = _one_line_error(UnreadableInputError, path)
    assert expect in msg and name in msg and "expected an AnnData" in msg


def test_hdf5_without_anndata(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["something"] = np.arange(3)
    msg = _one_line_error(UnreadableInputError, path)
    assert "not AnnData" in msg and "other.h5" in msg
    tenx = tmp_path / "tenx.h5"
    with h5py.File(tenx, "w") as f:
        f.create_group("matrix")
    assert "10x Genomics" in _one_line_error(UnreadableInputError, tenx)


def test_anndata_without_x(tmp_path, adata):
    a = adata.copy()
    path = tmp_path / "nox.h5ad"
    a.write_h5ad(path)
    with h5py.File(path, "a") as f:
        del f["X"]
    msg = _one_line_error(UnreadableInputError, path)
    assert "no X matrix" in msg and "counts" in msg
    assert open_source(path, layer="counts").n_cells == N_CELLS


def test_not_a_zarr_store(tmp_path):
    (tmp_path / "dir.zarr").mkdir()
    msg = _one_line_error(UnreadableInputError, tmp_path / "dir.zarr")
    assert "dir.zarr" in msg and "zarr" in msg


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_h5ad(files, tmp_path, fraction):
    data = files["h5ad-csr"].read_bytes()
    path = tmp_path / "cut.h5ad"
    path.write_bytes(data[: int(len(data) * fraction)])
    msg = _one_line_error(UnreadableInputError, path)
    assert "cut.h5ad" in msg


def test_corrupt_values_on_read(files, tmp_path):
    """Damage that shows only when rows are read is reported with the file and the cells."""
    path = tmp_path / "bad.h5ad"
    path.write_bytes(files["h5ad-csr"].read_bytes())
    src = open_source(path)
    src.close()
    with h5py.File(path, "r+") as f:  # make indptr point past the end of data for the last cells
        ip = f["X/indptr"][:]
        ip[-5:-1] = ip[-1] + 1000
        f["X/indptr"][...] = ip
    copy = pickle.loads(pickle.dumps(src))
    with pytest.raises(UnreadableInputError) as err:
        list(copy.iter_blocks(BLOCK))
    assert "bad.h5ad" in str(err.value) and "\n" not in str(err.value)


def test_unknown_layer(files, adata):
    for data in (files["h5ad-csr"], files["zarr3"], adata):
        msg = _one_line_error(InputError, data, layer="spliced")
        assert "'spliced' not found" in msg and "available layers: counts, lognorm, raw" in msg
    bare = ad.AnnData(X=adata.X.copy())
    assert "no layers" in _one_line_error(InputError, bare, layer="counts")


def test_wrong_type():
    assert "cannot read input of type list" in _one_line_error(InputError, [1, 2, 3])


def test_open_source_passes_sources_through(files):
    src = open_source(files["h5ad-csr"])
    assert open_source(src) is src
    with pytest.raises(InputError):
        open_source(src, layer="counts")


# --------------------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------------------


def _block(values: np.ndarray, start: int = 100, **kwargs) -> CellBlock:
    X = sp.csr_matrix(np.asarray(values, dtype=np.float32))
    return CellBlock(np.arange(start, start + X.shape[0]), X, **kwargs)


def test_check_values_accepts_counts():
    block = _block([[0, 1, 2], [0, 0, 0], [5, 0, 7]])
    check_values(block, require_counts=True)
    check_values(_block(np.zeros((0, 3))), require_counts=True)


@pytest.mark.parametrize(
    ("bad", "word"), [(-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")]
)
def test_check_values_invalid(bad, word):
    values = np.array([[0, 1, 2], [0, 3, 0], [4, 0, bad], [bad, 1, 1]], dtype=np.float32)
    with pytest.raises(InvalidValuesError) as err:
        check_values(_block(values, start=40), require_counts=False)
    msg = str(err.value)
    assert "cell 42 " in msg and word in msg and "\n" not in msg  # first offending cell, global index


def test_check_values_not_counts():
    values = np.log1p(np.array([[0, 1, 2], [0, 3, 0], [4, 0, 9]], dtype=np.float32))
    block = _block(values, start=10, layer=None, layers=("counts", "raw", "scaled"))
    check_values(block, require_counts=False)
    with pytest.raises(NotCountsError) as err:
        check_values(block, require_counts=True)
    msg = str(err.value)
    assert "raw integer counts" in msg and "log-transformed" in msg and "cell 10 " in msg
    assert "--layer counts" in msg and "--layer raw" in msg and "--allow-noncounts" in msg
    assert "\n" not in msg
    with pytest.raises(NotCountsError) as err:
        check_values(_block(values * 100), require_counts=True)
    none = str(err.value)
    assert "normalised" in none and "--layer" not in none and "--allow-noncounts" in none
    with pytest.raises(NotCountsError, match="available: spliced"):
        check_values(_block(values), require_counts=True, layers=["spliced"])


def test_check_values_on_source_blocks(files):
    src = open_source(files["h5ad-csr"], layer="lognorm")
    with pytest.raises(NotCountsError, match="--layer counts or --layer raw"):
        for block in src.iter_blocks(BLOCK):
            check_values(block, require_counts=True)
    for block in open_source(files["h5ad-csr"], layer="counts").iter_blocks(BLOCK):
        check_values(block, require_counts=True)
