"""Exceptions raised by ddkit. The CLI turns any :class:`DdkitError` into one red line and exit code 2.

Every message names the file, key or value at fault, so a user can fix the input without a traceback.
"""


class DdkitError(Exception):
    """Base class: a user-facing error with a one-line message."""


class ConfigError(DdkitError):
    """A config file or ``--set`` override is invalid (unknown key, wrong type, out of range)."""


class DataError(DdkitError):
    """A dataset root, image, shard or index is missing, corrupt or inconsistent."""


class WeightsError(DdkitError):
    """Model weights or a checkpoint are missing or do not match the config."""


class BudgetError(DdkitError):
    """The generation time budget cannot fit even ``steps_min`` steps at ``ipc_min`` images per class."""


class ClusterError(DdkitError):
    """SLURM is missing, a partition does not exist, or a request cannot fit it."""


class PackageError(DdkitError):
    """A submission package breaks the scorer's rules."""


class ContainerError(DdkitError):
    """Apptainer is missing or a container definition is invalid."""


class DistilledSetError(DataError, PackageError):
    """A distilled set (``dataset.pt``, a scorer tensor) is missing, unreadable or breaks the generation
    contract: a data error to ``ddkit evaluate``, a package error to ``ddkit package`` (:mod:`ddkit.distilled`)."""
