import sys

from plots.figures import main

sys.exit(main())
