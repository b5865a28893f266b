"""Snapshots, clones and rollback on a running daemon (ARCHITECTURE.md
"Snapshots").

coordinator.py runs the lifecycle for the control facade; quiesce.py the
hooks that freeze and thaw an application and the marker that makes a thaw
survive a crash; journal.py the local record of pending and failed
snapshots. What a snapshot is in the store is glide/repo/snapshots.py.
"""
