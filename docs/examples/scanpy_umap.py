"""Store -> UMAP coloured by cell type: the layers go into adata.obsm, scanpy does the rest."""

import matplotlib.pyplot as plt
import scanpy as sc

import cellstrata as cs

adata = sc.read_h5ad("atlas.h5ad")
cs.open_store("atlas.scgpt.zarr").to_anndata(adata, layers=[2, -1], pooling="cls")  # X_scgpt_L2, X_scgpt_L<last>
sc.pp.neighbors(adata, use_rep="X_scgpt_L2")  # block 2's <cls> embedding
sc.tl.umap(adata)
sc.pl.umap(adata, color="cell_type", show=False)
plt.savefig("umap_scgpt_L2.png", bbox_inches="tight")
