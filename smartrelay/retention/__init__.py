"""Data lifecycle: the purge that applies ``[retention]`` and the roll-ups that outlive it."""
