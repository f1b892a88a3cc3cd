import sys

from florence.cli import main

sys.exit(main())
