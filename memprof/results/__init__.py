"""Records and result folders. Enters: ``CellResult``s from the run stage (or a tracked loop). Leaves: the Record
(a cell's configuration and measurements), the folder on disk (records.jsonl, cells.csv, per-cell CSVs, env.json)
read back in any schema this memprof knows, and the metrics' comparison rules."""
