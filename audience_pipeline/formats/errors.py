class FileRejected(Exception):
    """The file as a whole cannot be imported; the message says which file, where and why."""
