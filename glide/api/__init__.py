"""The admin HTTP API (FastAPI on embedded uvicorn) and the metrics collector."""
