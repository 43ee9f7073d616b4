"""What a loaded artifact runs: quantized layers, the Q-Sched scheduler wrapper, the single-schedule cache hook
and the sampler call. Everything `export.load` needs and nothing that searches or solves."""
