"""The daemon process: start/stop order, data-directory lock, offline drain."""
