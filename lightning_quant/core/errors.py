"""Errors raised by lightning-quant."""


class QuantizationConfigError(ValueError):
    """An argument or recipe that cannot be used; the message names the argument, the value and the fix."""


class UnsupportedModuleError(TypeError):
    """A layer type the quantizer cannot wrap or export."""


class NonFiniteError(FloatingPointError):
    """A training step produced NaN or Inf; the message names the first layer whose output was not finite."""
