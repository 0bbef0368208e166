"""Evaluation: classification metrics, crowding of class centres, head diagnostics."""
