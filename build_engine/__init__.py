"""build_engine package."""
