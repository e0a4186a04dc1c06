"""What was learned: the results store, loss-curve and scaling-law fits, frontiers, figures.

Reads run folders (:mod:`embscale.base.rundir`) and the planned records in them; never the trainer or the data
pipeline."""
