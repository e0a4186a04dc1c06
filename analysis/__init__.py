"""What was learned: results store, fits, frontiers, figures. Never imports models' internals."""
