"""Model migration: the workflow's steps (steps.py), its input, lock and records, the backfill and the gate."""
