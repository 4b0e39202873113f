"""The `attncache` command line: thin click commands over `pipeline`."""
