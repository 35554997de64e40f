"""The local web inspector (``diffprobe inspect``): runs and stages, a feature browser, the
anomaly labelling tool, alignment and lens views and a side-by-side comparison of two runs.
Served by :mod:`diffprobe.app.server` (standard library only) on 127.0.0.1."""
