"""Stage `reco evaluate`: zero-shot classification and retrieval, the frozen CLIP against RECO."""
