"""The benchmarks, run from the repository root as modules: ``python -m benchmarks.peer`` (see
docs/performance.md for what each measures). Each variant runs in a fresh process, interleaved and
repeated; tables give the median and the spread (``common.spread``)."""
