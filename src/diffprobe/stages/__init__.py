"""Stages: one function per step of a study (extract, align, anomalies, lens, ...). Each reads
run folders or data, calls the pure analyses and the interventions, and writes tables and figures
into an output folder it claims (the folder rule of :mod:`diffprobe.io`). The CLI and the
experiment runner call these functions; they hold no logic of their own."""
