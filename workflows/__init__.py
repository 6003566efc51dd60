"""The driver side: CLI, config, planning and the Ray map/reduce/commit workflow (imports ray)."""
