"""The exceptions a user can cause. Each message says what to change."""


class MeLoraError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(MeLoraError, ValueError):
    """A configuration value is invalid; the message names the field, the value and what is allowed."""


class TargetModuleError(MeLoraError, ValueError):
    """A `target_modules` entry matches no `nn.Linear` of the model."""


class AdapterStateError(MeLoraError, RuntimeError):
    """An adapter file or model does not fit the adapter it is being combined with."""
