"""The one exception type that wdmjax raises for bad user input."""


class WdmjaxError(ValueError):
  """Bad input from a user: the message names the argument, the expected and the actual value.

  The CLI prints it as a single line (no traceback) and exits with status 2.
  """


def check(condition: bool, message: str) -> None:
  """Raises `WdmjaxError(message)` unless `condition` holds."""
  if not condition:
    raise WdmjaxError(message)
