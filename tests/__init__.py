"""
linkproxy's tests.

Under CI (C{CI} set in the environment) hypothesis runs derandomized, so a submission's result does not
depend on which examples a run happens to draw; locally it explores new examples every run.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
