import sys

from ctxload.cli import main

sys.exit(main())
