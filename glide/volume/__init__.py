"""One served volume: its binding to the store, the store cycle, read-through, scheduling."""
