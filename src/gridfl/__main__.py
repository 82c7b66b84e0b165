"""``python -m gridfl``: the ``gridfl`` command."""

from gridfl.cli import main

main()
