"""``python -m flaxchat``: the command line (``flaxchat/cli.py``)."""

import sys

from flaxchat.cli import main

sys.exit(main())
