import sys

from plots import wan
from plots.figures import main

code = main()
sys.exit(code or wan.main())
