"""Layers by label: pick a layer by its index and a cell by its name, with or without cellstrata."""

import xarray as xr

import cellstrata as cs

pooled = xr.open_zarr("atlas.scgpt.zarr", group="pooled")  # plain xarray: layer, depth and cell coordinates
cell = str(pooled.cell.values[0])  # the first cell's name (the AnnData's obs_names)
x = pooled["cls"].sel(layer=7, cell=cell).values  # [H]: one cell at the output of block 7
deepest = pooled["cls"].sel(layer=pooled.depth == 1).squeeze("layer")  # the last block, by relative depth
ds = cs.open_store("atlas.scgpt.zarr").to_xarray()  # every pooling + n_tokens / truncated, same labels
same = ds["cls"].sel(layer=7, cell=cell).values
