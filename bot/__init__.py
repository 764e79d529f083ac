"""newsbot: the WeChat newsletter bot (the wiring; chat features live in ``handlers``)."""

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"
