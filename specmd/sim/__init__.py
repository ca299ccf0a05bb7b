"""The research half: record routing traces, replay them through any policy mix, sweep, report.

Replay imports no torch; recording needs the model (and so torch) only because the model runs.
"""

from specmd.sim.record import TraceRecorder, record
from specmd.sim.replay import replay
from specmd.sim.trace import Trace, TraceError, TraceEvent, load_trace

__all__ = ["Trace", "TraceError", "TraceEvent", "TraceRecorder", "load_trace", "record", "replay"]
