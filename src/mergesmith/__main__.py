import sys

from mergesmith.cli import main

sys.exit(main())
