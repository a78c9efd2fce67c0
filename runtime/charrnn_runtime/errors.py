"""The errors a user can fix. The ground floor of the runtime: it imports nothing.

Every error about a request's field carries that field's name (the Python API's) as `.param`, so
an HTTP layer maps fields without reading messages.
"""


class CharrnnError(ValueError):
    """Bad input or an unusable model/environment; the message says what to fix."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # keeps .param across pickling (Ray sends errors between processes)
        return type(self), (str(self), self.param)
