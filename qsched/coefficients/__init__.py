"""Q-Sched, the method: learn per-step scheduler coefficients on the quantized pipeline with the
reference-free JAQ objective (runtime.schedulers applies them)."""
