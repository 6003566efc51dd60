"""mergeflow's driver side: CLI, config, planning and the Ray map/reduce/commit workflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergeflow")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"
