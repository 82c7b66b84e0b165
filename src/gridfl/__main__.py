"""``python -m gridfl``: the ``gridfl`` command."""

from gridfl.cli import main

# the guard matters: `gridfl simulate`'s spawned pool workers import this module again
if __name__ == "__main__":
    main()
