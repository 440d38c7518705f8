"""Experiments: the resumable cell engine and the sharded, resumable sample generation that
every mode (compare, sweep, table, fitting) runs on."""
