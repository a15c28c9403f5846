import sys

from megatron_rasft.cli import main

if __name__ == "__main__":
    sys.exit(main())
