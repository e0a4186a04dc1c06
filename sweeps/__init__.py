"""What to train and where: sweep files, expansion and matching, dispatch, the training run, data, the CLI."""
