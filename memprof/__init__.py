"""memprof: optimizer-state memory profiler and benchmark harness for LLM fine-tuning."""

__version__ = "0.1.0"
