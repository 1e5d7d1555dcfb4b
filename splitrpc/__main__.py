import sys

from splitrpc.train import main

sys.exit(main())
