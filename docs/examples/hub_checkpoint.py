"""Extract every layer of Geneformer V2 named on the Hugging Face hub; print where its weights came from."""

import cellstrata as cs

store = cs.extract(
    "cells.h5ad",  # raw counts; var["ensembl_id"] holds Ensembl gene ids
    model="geneformer",
    checkpoint="hf:ctheodoris/Geneformer/Geneformer-V2-104M@main",  # a branch, tag or commit
    gene_column="ensembl_id",
    out="cells_geneformer.zarr",
)
hub = store.attrs["hub"]
print(hub["repo"], hub["subfolder"], "at", hub["revision"])  # the commit the branch pointed to
for path, sha256 in hub["files"].items():
    print(f"  {path}  sha256 {sha256[:12]}")
