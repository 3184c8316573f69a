"""Reliability suite (issue 14): corruption caught on read, locks, overwrite, errors that lead somewhere."""
