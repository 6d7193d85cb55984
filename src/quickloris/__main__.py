import sys

from quickloris.cli.main import main

sys.exit(main())
