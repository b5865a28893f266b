"""Zero-downtime handoff between a running daemon and its successor.

This package owns the handoff's durable phase journal (journal.py). The wire
protocol and the predecessor/successor logic come later; nothing here is wired
into the daemon yet.
"""
