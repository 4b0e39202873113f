"""What is stored per (sample, layer, head) and how attention comes back: encodings, their spec grammar, finite checks, KL."""
