"""Data files shipped with the package (the CLIP BPE vocabulary)."""
