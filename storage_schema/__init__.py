"""The cache store's schema: versions, JSON Schemas and validation."""
