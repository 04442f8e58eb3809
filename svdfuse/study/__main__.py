import sys

from svdfuse.study import main

sys.exit(main())
