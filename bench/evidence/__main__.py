import sys

from bench.evidence.cli import main

sys.exit(main())
