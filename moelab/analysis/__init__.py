"""Looking inside MoE models from outside: a routing recorder (hooks), the seed papers' routing and
expert statistics, and the `moelab analyze` report. The model code never imports this package."""

from moelab.analysis.analyze import analyze
from moelab.analysis.recorder import RoutingRecorder

__all__ = ["RoutingRecorder", "analyze"]
