"""Stages `reco download` (img2dataset on Ray) and `reco embed` (the corpus into the Parquet memory)."""
