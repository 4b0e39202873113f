"""attncache pipeline: data, augmentation, teacher capture, factor encodings, the Zarr store, precompute."""
