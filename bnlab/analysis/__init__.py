"""Reading run and sweep dirs after training: `bnlab compare` (compare.py) and `bnlab plot`
(plot.py). Nothing here trains or changes a run dir; it only reads them and writes the tables
and figures asked for."""
