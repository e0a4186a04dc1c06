"""What every layer shares: errors, atomic files, the data-file reader, the run-folder contract, progress."""
