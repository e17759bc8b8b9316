"""The one error type users see: it always says which file and which record."""


class WitError(Exception):
    """A problem with the user's input or recipe, phrased for the user.

    `where` names the file, and `record` the offset, line, page or key inside it, so that the
    message alone is enough to find the bad input.
    """

    def __init__(self, message: str, where: str | None = None, record: str | None = None):
        self.where = where
        self.record = record
        prefix = ""
        if where:
            prefix = f"{where}"
            if record:
                prefix += f" ({record})"
            prefix += ": "
        super().__init__(prefix + message)
