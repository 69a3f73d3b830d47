"""Training data: the one folder reader (`folder`), the dataset (`dataset`), aspect buckets (`buckets`), latent and
text caches (`cache`) and the procedural demo images (`demo`)."""
