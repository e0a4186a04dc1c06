"""How one run trains: the run config, the trainer's steps, optimizers, checkpoint state, distributed setup, data."""
