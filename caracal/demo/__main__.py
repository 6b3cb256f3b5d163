# -*- test-case-name: tests.integration.test_demo -*-
"""C{python -m caracal.demo}: see L{caracal.demo.run}."""

import sys

from caracal.demo.run import main

sys.exit(main())
