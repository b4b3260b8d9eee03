"""Hallucination evaluation: POPE, CHAIR and AMBER-style metrics, readers of the published formats, reports."""
