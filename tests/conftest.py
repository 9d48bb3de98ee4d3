"""Shared test configuration: Hypothesis profiles.

``ci`` (derandomized, no deadline, no example database, ~25 examples) loads when the
``CI`` environment variable is set; otherwise ``dev`` (more examples) unless
``HYPOTHESIS_PROFILE`` names another registered profile.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)

if os.environ.get("CI"):
    settings.load_profile("ci")
else:
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
