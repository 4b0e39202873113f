"""Augmentation recipes drawn once per sample, stored and replayed bit for bit; RandAugment; Mixup/CutMix within a unit."""
