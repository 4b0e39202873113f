"""Whole studies built from the rooms below: the embedded data set, teacher pretraining, the demo, the paper's repro."""
