"""Tools over a store or a teacher: plan, fidelity against bytes, attention figures, verify --recompute."""
