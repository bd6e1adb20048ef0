"""Prefect front-end: tasks that wrap adps.stages, the flows, and their deployments."""
