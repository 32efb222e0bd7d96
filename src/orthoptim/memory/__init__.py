"""FOGO's long-term memory (codebook of protected subspaces)."""
