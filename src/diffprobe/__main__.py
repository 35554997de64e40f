"""``python -m diffprobe ...`` (and ``torchrun -m diffprobe ...``) is the ``diffprobe`` command."""

from diffprobe.cli import main

main()
