import sys

from vitok.bench import main

sys.exit(main())
