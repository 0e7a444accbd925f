"""memprof inside the user's own training: ``track`` for a hand-written loop and ``MemprofCallback`` for a
``transformers.Trainer``. Enters: a live model and optimizer. Leaves: the same Records and result folders as
``memprof run``."""
