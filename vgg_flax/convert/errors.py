"""The one error type of conversion: bad weight files, state dicts and downloads."""


class ConversionError(ValueError):
    """A weight file or state dict that cannot be converted; the message names the key and shapes."""
