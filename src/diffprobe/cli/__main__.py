"""``python -m diffprobe.cli ...`` is the ``diffprobe`` command."""

from diffprobe.cli import main

main()
