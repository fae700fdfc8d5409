"""Worker processes: one per GPU (or one on the CPU), configured for long jobs."""
