"""Webdataset tar shards: listing, reading every member once, decoding, bad samples, packing, and binding a store to its shards."""
