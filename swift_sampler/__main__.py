import sys

from swift_sampler.cli import main

sys.exit(main())
