"""Replication of snapshots to a second store: jobs, steps, pins, pruning."""
