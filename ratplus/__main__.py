import sys

from ratplus.cli import main

sys.exit(main())
