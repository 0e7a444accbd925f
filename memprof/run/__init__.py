"""Running cells in processes: the runner drives a pool (local zygotes or Ray), each zygote forks one process per
cell, a sharded cell forks its ranks, the worker measures. Enters: a ``Suite`` and its cells. Leaves: a results
folder written cell by cell, and ``StepDone``/``CellDone`` messages for whoever watches."""
