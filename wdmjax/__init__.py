from wdmjax.version import __version__  # noqa: F401
