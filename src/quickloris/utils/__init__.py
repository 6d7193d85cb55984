"""Small helpers with no heavy imports (atomic file writes, run provenance)."""
