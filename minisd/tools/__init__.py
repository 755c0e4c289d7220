"""Tools: the command line's commands, the benchmark, the fast path and tiled VAE decoding."""
