"""What is trained: modules, configs, exact parameter and FLOP accounting. No I/O beyond reading config files."""
