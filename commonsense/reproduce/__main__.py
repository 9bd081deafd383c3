import sys

from commonsense.reproduce.cli import main

sys.exit(main())
