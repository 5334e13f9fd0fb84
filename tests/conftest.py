"""Tiny models run fastest on one thread (thread start-up costs more than the math).

The torch exporter's disk trace cache (export/exporters/trace_cache.py) goes to a folder of
this test session, not the user's ~/.cache: a run starts cold and leaves nothing behind
(an explicit SHIRA_EXPORT_TRACE_CACHE, e.g. `off`, is kept)."""

import atexit
import os
import shutil
import tempfile

import torch

torch.set_num_threads(1)

if "SHIRA_EXPORT_TRACE_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="shira_trace_cache_")
    os.environ["SHIRA_EXPORT_TRACE_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
