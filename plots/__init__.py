"""Figures and tables from results/*.jsonl (`make plots`)."""
