"""``python -m moelab.train ARGS`` = ``moelab train ARGS``; what ``torchrun -m moelab.train`` runs on each rank."""

import sys

from moelab.cli import main_entry

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "train", *sys.argv[1:]]
    main_entry()
