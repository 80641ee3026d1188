"""Collect: an uploaded adapter checked and accepted under its lease; partial uploads kept for resuming."""
