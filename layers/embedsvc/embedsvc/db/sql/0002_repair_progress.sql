-- A repair that ran out of time checkpoints where it got; the next run resumes there without the overlap
-- a complete run's checkpoint needs (that overlap covers transactions still open at the checkpoint, and
-- a partial checkpoint lies in the past), so a long backlog is worked through instead of restarted.
ALTER TABLE repair_checkpoints ADD COLUMN complete boolean NOT NULL DEFAULT true;
