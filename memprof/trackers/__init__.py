"""Measurement sources. Each is a small context manager (or a pure function for exact accounting), read after
it exits; none resets anything its caller did not ask for."""
