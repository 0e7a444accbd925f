"""Measuring a training loop: trackers (allocator, NVML, host RSS, saved activations, exact tensor accounting), the
probe that connects them to the loop, the optimizer-state formulas, the attribution of the peak and the profiler
cross-check. Enters: a model, an optimizer and the loop's events. Leaves: figures as Record fields."""
