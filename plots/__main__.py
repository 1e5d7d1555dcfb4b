import sys

from plots import docs, wan
from plots.figures import main

code = main()
sys.exit(code or wan.main() or docs.main())
