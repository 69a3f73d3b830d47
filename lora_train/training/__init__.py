"""Training: the loop (`trainer`), optimizers (`optim`)."""
