"""Figures and reports: read results (arrays, tables, run folders) and draw them. Nothing here
computes a measurement; every file goes through :mod:`diffprobe.io`."""
