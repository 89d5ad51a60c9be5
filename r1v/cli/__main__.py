import sys

from r1v.cli.app import main

sys.exit(main())
