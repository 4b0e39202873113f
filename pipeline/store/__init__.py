"""The Zarr cache store: layout, metadata and cache id, markers and integrity, the writer lease, and checks that run no model."""
