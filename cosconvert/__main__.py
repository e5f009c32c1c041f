import sys

from cosconvert.cli import main

sys.exit(main())
