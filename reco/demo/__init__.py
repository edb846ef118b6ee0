"""The demo package: `reco demo`'s small world and the synthetic data that tests and benchmarks use.

- `run`: the `reco demo` driver (run_demo, DemoScale, demo_config);
- `world`: the world's classes split into memory, fusion and held-out evaluation sets, and its config;
- `pretrain`: the stand-in frozen CLIP, reco-tiny pre-trained on coarse captions;
- `synthetic`: drawn image-text pairs of 72 fine-grained classes, and clustered embeddings;
- `corpus_server`: the corpus served over HTTP on 127.0.0.1, with broken URLs, for download;
- `neighbour_splits`: synthetic neighbour shards, written as `reco neighbors` writes them.

Production code (pipeline/, indexing/, training/, evaluation/) never imports this package.
"""
