"""attncache pipeline: the cache side (data, augment, teacher, encodings, store, precompute), the training side
(train), and the tools and studies above them. The rooms and their one-way imports: README.md, "Layout"."""
