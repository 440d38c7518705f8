"""The common layer, under every other: crash-safe files and sealed records (``files``), the
one digest and settings diff (``identity``), progress lines (``progress``), config checks
(``checks``), devices and processes (``parallel``), datasets (``data``), tables and plots
(``reporting``, ``image_grid``). Imports nothing of deis_jax outside this folder."""
