"""reco: RECO (retrieval-enhanced CLIP) at scale on Ray; this package holds what the stages share.

`reco.load(workdir)` (reco/api.py) gives a trained workdir's refined embeddings to applications.
"""


def __getattr__(name: str):
    # Imported on first use: `import reco` (every CLI call) stays free of torch and faiss.
    if name == "load":
        from reco.api import load
        return load
    raise AttributeError(f"module 'reco' has no attribute {name!r}")
