"""Parallel training, small enough to read: a launcher, communication accounting, a plan (device mesh), and
one short file per kind of parallelism, each checked against the single-process model."""
