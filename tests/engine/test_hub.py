"""Checkpoints by name from the Hugging Face hub (``hf:ORG/REPO[/SUBFOLDER][@REVISION]``), offline only.

The tests lay out a hub cache folder themselves, as huggingface_hub writes one
(``models--ORG--REPO/{blobs,snapshots/<commit>,refs/<branch>}``, snapshot files are relative symlinks
to blobs), holding random checkpoints in the official formats written by the families'
``init_checkpoint``; ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` point huggingface_hub at it, so nothing
is ever downloaded.
"""

from __future__ import annotations

import hashlib
import os
import runpy
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import zarr

import cellstrata as cs
from cellstrata.cli import main
from cellstrata.engine.errors import CheckpointError, ConfigError
from cellstrata.engine.input.datasets import gene_ensembl_ids, synthetic_dataset
from cellstrata.engine.models import get_family
from cellstrata.engine.models.hub import HubName, load_checkpoint, parse_hub_name, resolve_checkpoint

GENEFORMER = "ctheodoris/Geneformer"
TAHOE = "tahoebio/Tahoe-x1"
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "hub_checkpoint.py"


def _commit(seed: int) -> str:
    return hashlib.sha1(f"commit {seed}".encode()).hexdigest()


def lay_out(cache: Path, repo: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ()) -> Path:
    """Put ``files`` (repository path -> local file) in the cache as snapshot ``commit``; ``refs`` point at it.

    Blobs are named as the hub names them: large files (LFS) by their sha256, the others by their git blob sha1.
    """
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for rel, src in files.items():
        data = Path(src).read_bytes()
        lfs = rel.endswith((".safetensors", ".bin", ".pkl"))
        blob_id = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = storage / "blobs" / blob_id
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # the hub writes the bare commit, no newline
    return snapshot


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """A hub cache with Geneformer (two commits of V2 + a V1 folder; gc104M and gc30M dictionaries) and Tahoe-X1."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    gf = get_family("geneformer")
    v2_main = gf.init_checkpoint("tiny", root / "v2-main", seed=3)
    v2_old = gf.init_checkpoint("tiny", root / "v2-old", seed=4)
    v1 = gf.init_checkpoint("v1-10m", root / "v1", seed=5, genes=gene_ensembl_ids(17))
    main_commit, old_commit = _commit(1), _commit(2)

    def geneformer_files(v2: Path) -> dict[str, Path]:
        return {
            "Geneformer-V2-104M/config.json": v2 / "config.json",
            "Geneformer-V2-104M/model.safetensors": v2 / "model.safetensors",
            "Geneformer-V1-10M/config.json": v1 / "config.json",
            "Geneformer-V1-10M/model.safetensors": v1 / "model.safetensors",
            "geneformer/token_dictionary_gc104M.pkl": v2 / "token_dictionary_gc104M.pkl",
            "geneformer/gene_median_dictionary_gc104M.pkl": v2 / "gene_median_dictionary_gc104M.pkl",
            "geneformer/gene_dictionaries_30m/token_dictionary_gc30M.pkl": v1 / "token_dictionary_gc30M.pkl",
            "geneformer/gene_dictionaries_30m/gene_median_dictionary_gc30M.pkl": v1
            / "gene_median_dictionary_gc30M.pkl",
            "README.md": v2 / "config.json",  # a file no loader reads
        }

    lay_out(cache, GENEFORMER, main_commit, geneformer_files(v2_main), refs=("main",))
    lay_out(cache, GENEFORMER, old_commit, geneformer_files(v2_old), refs=("v0",))
    tx = get_family("tahoe-x1").init_checkpoint("tiny", root / "tx", seed=6)
    tahoe_commit = _commit(3)
    names = ("model.safetensors", "model_config.yml", "collator_config.yml", "vocab.json")
    lay_out(cache, TAHOE, tahoe_commit, {f"70m-model/{n}": tx / n for n in names}, refs=("main",))
    data = root / "cells.h5ad"
    synthetic_dataset(37, 2000, seed=8, genes_per_cell=90).write_h5ad(data)
    return {
        "root": root,
        "cache": cache,
        "v2_main": v2_main,
        "v2_old": v2_old,
        "v1": v1,
        "tx": tx,
        "main": main_commit,
        "old": old_commit,
        "tahoe": tahoe_commit,
        "data": data,
    }


@pytest.fixture(autouse=True)
def offline(hub, monkeypatch):
    """Every test reads the laid-out cache only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)


# ------------------------------------------------------------------------------------------------
# names


def test_parse_hub_name(tmp_path, monkeypatch):
    assert parse_hub_name("hf:ctheodoris/Geneformer") == HubName("ctheodoris/Geneformer", "", None)
    name = parse_hub_name("hf:ctheodoris/Geneformer/Geneformer-V2-104M@v0")
    assert name == HubName("ctheodoris/Geneformer", "Geneformer-V2-104M", "v0")
    assert str(name) == "hf:ctheodoris/Geneformer/Geneformer-V2-104M@v0" and name.ref == "v0"
    assert parse_hub_name("hf:a/b/c/d@refs/pr/3") == HubName("a/b", "c/d", "refs/pr/3")
    assert parse_hub_name("hf:a/b").ref == "main"
    assert parse_hub_name(str(tmp_path)) is None and parse_hub_name(None) is None
    for bad in ("hf:", "hf:Geneformer", "hf:a/b@", "hf:a/../b", "hf:a/b/../c", "hf:a/b@x y", "hf:a b/c"):
        with pytest.raises(ConfigError, match=r"hf:ORG/REPO\[/SUBFOLDER\]\[@REVISION\]"):
            parse_hub_name(bad)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf:x").mkdir()  # an existing folder is a folder, whatever its name
    assert parse_hub_name("hf:x") is None


# ------------------------------------------------------------------------------------------------
# resolving: by name, by revision (commit and branch), subfolder; only the files the loader reads


def test_resolve_by_name_revision_and_subfolder(hub):
    snapshots = hub["cache"] / "models--ctheodoris--Geneformer" / "snapshots"
    v2_files = (
        "Geneformer-V2-104M/config.json",
        "Geneformer-V2-104M/model.safetensors",
        "geneformer/token_dictionary_gc104M.pkl",
        "geneformer/gene_median_dictionary_gc104M.pkl",
    )
    by_name = resolve_checkpoint("geneformer", parse_hub_name(f"hf:{GENEFORMER}/Geneformer-V2-104M"))
    assert by_name.commit == hub["main"] and by_name.files == v2_files
    assert by_name.folder == snapshots / hub["main"] / "Geneformer-V2-104M"
    for spec in (f"@{hub['old']}", "@v0"):  # a commit and a branch
        old = resolve_checkpoint("geneformer", parse_hub_name(f"hf:{GENEFORMER}/Geneformer-V2-104M{spec}"))
        assert old.commit == hub["old"] and old.folder == snapshots / hub["old"] / "Geneformer-V2-104M"
        assert sha256(old.folder / "model.safetensors") == sha256(hub["v2_old"] / "model.safetensors")
    assert sha256(by_name.folder / "model.safetensors") != sha256(hub["v2_old"] / "model.safetensors")
    # V1: the gc104M dictionary (2004 tokens) is not this model's; the gc30M one (19 tokens) is
    v1 = resolve_checkpoint("geneformer", parse_hub_name(f"hf:{GENEFORMER}/Geneformer-V1-10M@main"))
    assert v1.files == (
        "Geneformer-V1-10M/config.json",
        "Geneformer-V1-10M/model.safetensors",
        "geneformer/gene_dictionaries_30m/token_dictionary_gc30M.pkl",
        "geneformer/gene_dictionaries_30m/gene_median_dictionary_gc30M.pkl",
    )
    tahoe = resolve_checkpoint("tahoe-x1", parse_hub_name(f"hf:{TAHOE}/70m-model"))
    assert tahoe.commit == hub["tahoe"] and {Path(f).name for f in tahoe.files} == {
        "model.safetensors",
        "model_config.yml",
        "collator_config.yml",
        "vocab.json",
    }


def test_loaded_model_records_repo_revision_and_file_hashes(hub):
    family = get_family("geneformer")
    loaded = load_checkpoint(family, f"hf:{GENEFORMER}/Geneformer-V1-10M@v0", device="cpu")
    rec = loaded.checkpoint["hub"]
    assert rec["repo"] == GENEFORMER and rec["subfolder"] == "Geneformer-V1-10M"
    assert rec["revision"] == hub["old"] and rec["requested_revision"] == "v0"
    assert rec["name"] == f"hf:{GENEFORMER}/Geneformer-V1-10M@{hub['old']}"
    assert rec["files"] == {
        "Geneformer-V1-10M/config.json": sha256(hub["v1"] / "config.json"),
        "Geneformer-V1-10M/model.safetensors": sha256(hub["v1"] / "model.safetensors"),
        "geneformer/gene_dictionaries_30m/token_dictionary_gc30M.pkl": sha256(hub["v1"] / "token_dictionary_gc30M.pkl"),
        "geneformer/gene_dictionaries_30m/gene_median_dictionary_gc30M.pkl": sha256(
            hub["v1"] / "gene_median_dictionary_gc30M.pkl"
        ),
    }
    # the cache names large blobs by their sha256: the record agrees with the hub's own name
    weights = loaded.checkpoint["path"] + "/model.safetensors"
    assert Path(os.path.realpath(weights)).name == rec["files"]["Geneformer-V1-10M/model.safetensors"]
    assert loaded.checkpoint["sha256"] == rec["files"]["Geneformer-V1-10M/model.safetensors"]
    local = family.load(hub["v1"], device="cpu")  # the same files as a folder: the same model
    assert local.n_layers == loaded.n_layers == 6 and local.config == loaded.config
    tahoe = load_checkpoint(get_family("tahoe-x1"), f"hf:{TAHOE}/70m-model", device="cpu").checkpoint
    names = ("model.safetensors", "model_config.yml", "collator_config.yml", "vocab.json")
    assert tahoe["hub"]["files"] == {f"70m-model/{n}": sha256(hub["tx"] / n) for n in names}
    assert "hub" not in family.load(hub["v1"], device="cpu").checkpoint


# ------------------------------------------------------------------------------------------------
# the command line: extract, info, resume from another cache


def _extract(hub, out: Path, checkpoint: str, *extra: str) -> int:
    args = ["extract", str(hub["data"]), "--model", "geneformer", "--checkpoint", checkpoint, "--out", str(out)]
    return main([*args, "--gene-column", "ensembl_id", "--dtype", "float32", "--chunk-cells", "16", "--quiet", *extra])


def test_extract_by_name_records_provenance_and_resumes_from_another_cache(hub, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hub.zarr"
    assert _extract(hub, out, f"hf:{GENEFORMER}/Geneformer-V2-104M@main") == 0
    store = cs.open_store(out)
    rec = store.attrs["hub"]
    assert (rec["repo"], rec["subfolder"], rec["revision"]) == (GENEFORMER, "Geneformer-V2-104M", hub["main"])
    assert rec["files"]["Geneformer-V2-104M/model.safetensors"] == sha256(hub["v2_main"] / "model.safetensors")
    assert rec["files"]["geneformer/token_dictionary_gc104M.pkl"] == sha256(
        hub["v2_main"] / "token_dictionary_gc104M.pkl"
    )
    assert store.attrs["model"]["sha256"] == sha256(hub["v2_main"] / "model.safetensors")
    assert store.attrs["weights"]["weights"] == "random"  # the random_init_seed of config.json, read in the cache
    capsys.readouterr()
    assert main(["info", str(out), "--quiet"]) == 0
    info = capsys.readouterr().out
    assert f"hub         {GENEFORMER}/Geneformer-V2-104M at {hub['main']} (asked for main)" in info
    assert f"model.safetensors {rec['files']['Geneformer-V2-104M/model.safetensors'][:12]}" in info

    # the same files as a local folder: the same numbers and the same configuration (no hub record)
    local = tmp_path / "local.zarr"
    assert _extract(hub, local, str(hub["v2_main"])) == 0
    ref = cs.open_store(local)
    assert ref.attrs["config_hash"] == store.attrs["config_hash"] and "hub" not in ref.attrs
    np.testing.assert_array_equal(store.layers("mean").compute(), ref.layers("mean").compute())

    # another machine: the cache elsewhere; the half-written store resumes instead of being refused
    moved = tmp_path / "other-cache"
    shutil.copytree(hub["cache"], moved, symlinks=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(moved))
    before = store.layers("mean").compute()
    group = zarr.open_group(str(out), mode="r+")
    group["pooled"]["mean"][:, 16:32] = 0  # chunk 1 forgotten: only a resumed run brings it back
    group["done"][1] = 0
    assert _extract(hub, out, f"hf:{GENEFORMER}/Geneformer-V2-104M@main") == 0
    again = cs.open_store(out)
    assert np.asarray(again.done).all() and again.attrs["config_hash"] == store.attrs["config_hash"]
    np.testing.assert_array_equal(again.layers("mean").compute(), before)


def _one_line(capfd) -> str:
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cellstrata: error: ") and "Traceback" not in err, err
    return lines[0]


def test_offline_missing_files_is_one_line_exit_2(hub, tmp_path, monkeypatch, capfd):
    partial = tmp_path / "partial"
    shutil.copytree(hub["cache"], partial, symlinks=True)
    snapshot = partial / "models--ctheodoris--Geneformer" / "snapshots" / hub["main"]
    (snapshot / "Geneformer-V2-104M" / "model.safetensors").unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(partial))
    capfd.readouterr()
    assert _extract(hub, tmp_path / "a.zarr", f"hf:{GENEFORMER}/Geneformer-V2-104M") == 2
    line = _one_line(capfd)
    assert f"{GENEFORMER} at main (commit {hub['main'][:12]})" in line and "HF_HUB_OFFLINE is set" in line
    assert "missing: Geneformer-V2-104M/model.safetensors or Geneformer-V2-104M/pytorch_model.bin" in line
    assert f"hf download {GENEFORMER} Geneformer-V2-104M/model.safetensors --revision {hub['main']}" in line

    (snapshot / "geneformer" / "gene_dictionaries_30m" / "token_dictionary_gc30M.pkl").unlink()  # dictionaries too
    assert _extract(hub, tmp_path / "b.zarr", f"hf:{GENEFORMER}/Geneformer-V1-10M") == 2
    line = _one_line(capfd)
    assert "missing: Geneformer token dictionary with 19 tokens (config.json vocab_size)" in line
    assert "in Geneformer-V1-10M/ or geneformer/" in line

    for spec, missing in (
        (f"hf:{GENEFORMER}/Geneformer-V2-104M@v9", "Geneformer-V2-104M/config.json"),  # a branch never fetched
        (f"hf:{GENEFORMER}/Geneformer-V2-999M", "Geneformer-V2-999M/config.json"),  # a folder not cached
        ("hf:someone/elses-model", "config.json"),  # a repository not cached
    ):
        assert _extract(hub, tmp_path / "c.zarr", spec) == 2
        line = _one_line(capfd)
        assert "HF_HUB_OFFLINE is set" in line and f"missing: {missing}" in line, line
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "c.zarr").exists()


def test_unreachable_hub_uses_the_cache_or_says_so_in_one_line(hub, tmp_path, monkeypatch, capfd):
    """Online, but the endpoint refuses connections (a closed local port): like huggingface_hub, use the cache."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    cached = resolve_checkpoint("geneformer", parse_hub_name(f"hf:{GENEFORMER}/Geneformer-V2-104M@v0"))
    assert cached.commit == hub["old"] and len(cached.files) == 4
    with pytest.raises(CheckpointError, match="the hub could not be reached") as err:
        resolve_checkpoint("tahoe-x1", parse_hub_name(f"hf:{TAHOE}/3b-model"))
    line = str(err.value)
    assert "missing: 3b-model/model_config.yml (cached tahoe-x1 model folders: 70m-model)" in line
    assert "Check the network (or HF_ENDPOINT)" in line and f"hf download {TAHOE} 3b-model/model_config.yml" in line
    capfd.readouterr()
    assert _extract(hub, tmp_path / "s.zarr", f"hf:{GENEFORMER}/Geneformer-V2-104M@v7") == 2
    line = _one_line(capfd)
    assert f"{GENEFORMER} at v7 is not in the Hugging Face cache" in line and "could not be reached" in line


@pytest.mark.parametrize(
    ("model", "page"),
    [("scgpt", "github.com/bowang-lab/scGPT"), ("scfoundation", "github.com/biomap-research/scFoundation")],
)
def test_families_not_on_the_hub_point_to_their_download_pages(hub, tmp_path, capfd, model, page):
    args = ["extract", str(hub["data"]), "--model", model, "--checkpoint", "hf:someone/mirror", "--out"]
    capfd.readouterr()
    assert main([*args, str(tmp_path / "s.zarr"), "--quiet"]) == 2
    line = _one_line(capfd)
    assert page in line and "Hugging Face hub" in line and "--checkpoint FOLDER" in line
    with pytest.raises(CheckpointError, match=page):
        resolve_checkpoint(model, parse_hub_name("hf:someone/mirror"))


def test_readme_example_runs(hub, tmp_path, monkeypatch, capsys):
    """docs/examples/hub_checkpoint.py, as the README shows it, against the laid-out cache."""
    shutil.copy(hub["data"], tmp_path / "cells.h5ad")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert f"{GENEFORMER} Geneformer-V2-104M at {hub['main']}" in out
    assert f"model.safetensors  sha256 {sha256(hub['v2_main'] / 'model.safetensors')[:12]}" in out
    assert cs.open_store(tmp_path / "cells_geneformer.zarr").attrs["hub"]["revision"] == hub["main"]
