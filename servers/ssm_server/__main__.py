"""``python -m servers.ssm_server …``"""

import sys

from servers.ssm_server.cli import run_from_argv

sys.exit(run_from_argv(sys.argv[1:]))
