"""`make demo` entry point (training arrives with the next issue)."""

import sys

if __name__ == "__main__":
    print("make demo: training, the built-in corpus and the run report are not built yet (issue 4).")
    sys.exit(1)
