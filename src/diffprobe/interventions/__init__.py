"""Interventions: procedures composed from the one hook engine (capture, typed edits, early
stop): the Diffusion Lens, steering, deep dream, h-space edits."""
