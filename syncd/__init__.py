"""syncd: training code appends run records; syncd mirrors them into MLflow."""

from syncd.record.recorder import RunRecorder

__version__ = "0.1.0"
__all__ = ["RunRecorder", "__version__"]
