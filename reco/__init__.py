"""reco: RECO (retrieval-enhanced CLIP) at scale on Ray; this package holds what the stages share."""
