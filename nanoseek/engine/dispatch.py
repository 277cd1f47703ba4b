"""Calling torch.compile'd functions without dynamo's frame handling, once they are warm.

    f = Direct(torch.compile(fn, dynamic=False))
    y = f(sig, *args)        # sig: the caller's name for the input signature (graphs.py: batch size, rows)

engine/graphs.py wraps every compiled decode function in one. The first call of a signature goes
through dynamo (which compiles); later calls run the code dynamo generated for it directly, after
checking that code's guards.
"""
from __future__ import annotations

import types


class Direct:
    """A torch.compile'd function, called straight into the code dynamo made for an input signature
    once it has seen it (vLLM's TorchCompileWrapperWithCustomDispatcher does the same on GPUs).
    Going through dynamo's frame evaluation cost ~0.5 ms a call here, with 4 graphs per function
    (small, batch 1: 5.94 -> 5.42 ms a step, median of 30 interleaved rounds of 30 calls), against
    ~10 µs for the guards themselves. So the guards of the entry that matched last time are still
    checked on every call (the same checks dynamo makes; a miss goes back through dynamo, which
    recompiles if it must), only the frame machinery is skipped. An entry whose code would resume
    after a graph break is never called this way (its resume functions would run uncompiled)."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.orig = compiled._torchdynamo_orig_callable
        code = self.orig.__code__
        self.names = code.co_varnames[: code.co_argcount]
        self.known: dict = {}              # signature -> (guard manager, function on dynamo's code)

    def __call__(self, sig, *args):
        hit = self.known.get(sig)
        if hit is not None and hit[0].check(dict(zip(self.names, args))):
            return hit[1](*args)
        out = self.compiled(*args)
        self._learn(sig, args)
        return out

    def _learn(self, sig, args) -> None:
        try:
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list
            f_locals = dict(zip(self.names, args))
            for entry in _debug_get_cache_entry_list(self.orig.__code__):
                if entry.guard_manager.check(f_locals):
                    if not any(n.startswith("__resume_at") for n in entry.code.co_names):
                        fn = types.FunctionType(entry.code, self.orig.__globals__, self.orig.__name__,
                                                self.orig.__defaults__, self.orig.__closure__)
                        self.known[sig] = (entry.guard_manager, fn)
                    return
        except (ImportError, AttributeError, TypeError):      # a torch without these internals: dynamo's way
            self.known[sig] = None
