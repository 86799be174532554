"""``python -m tamis.server [serve options]``."""

import sys

from tamis.server.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
