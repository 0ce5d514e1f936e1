"""kerasbn's test suite (a package, so that every module imports its
helpers as `from tests.helpers import name`)."""
