import sys

from padmmirnn.cli import main

sys.exit(main())
