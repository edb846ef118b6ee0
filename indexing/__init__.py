"""Stages `reco index` (sharded faiss indices of the memory) and `reco neighbors` (each training pair's neighbours)."""
