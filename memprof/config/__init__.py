"""What a cell is, as plain data (no torch): the nested configuration specs and their grid axes
(``memprof.config.spec``), the architecture presets and the optimizer catalogue. Enters: nothing; every other stage
reads it."""
