"""`python -m moelab.cli ...` is `moelab ...`."""

from moelab.cli import main_entry

main_entry()
