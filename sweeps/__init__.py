"""What to train and where: sweep files, expansion and matching, the plan, executors, submit, status, cancel, tune."""
