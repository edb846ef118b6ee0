"""The test suite: offline, on real Ray, faiss, img2dataset, Parquet and a moto S3 server."""
