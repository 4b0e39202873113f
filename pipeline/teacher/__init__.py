"""The teacher ViT: loading (timm name, checkpoint, pretrain directory), Q/K capture, and the one-image self-check."""
