"""``python -m syncnorm doctor [...]``: see :mod:`syncnorm.doctor`."""

import sys

from .doctor import main

if __name__ == "__main__":
    if sys.argv[1:2] != ["doctor"]:
        print("usage: python -m syncnorm doctor [--model SOURCE:NAME] [--json] (under torchrun)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[2:]))
