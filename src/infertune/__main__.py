import sys

from infertune.cli import main

sys.exit(main())
