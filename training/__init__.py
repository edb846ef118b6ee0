"""Stage `reco train`: the fusion modules trained with the RECO loss on Ray Train."""
