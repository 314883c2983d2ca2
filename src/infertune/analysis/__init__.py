"""Accuracy analysis: output comparison (and, later, layerwise compare and sensitivity)."""
