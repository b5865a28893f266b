"""Zero-downtime handoff between a running daemon and its successor
(handoff.md; ARCHITECTURE.md "Handoff").

protocol.py is the wire; predecessor.py and successor.py are the two sides'
steps; record.py the outcome an operator reads; stats.py the counters that
outlive a process; journal.py each side's durable phase; crash_points.py
the fault injection the tests drive.
"""
