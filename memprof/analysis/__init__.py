"""Computations over records and loss curves, no torch: convergence figures and diagnoses (used by the worker as
it finishes a cell), statistics, activation slopes, the regression comparison and the report's tables. Enters:
Records and per-step logs. Leaves: figures and judgements as plain data for the views."""
