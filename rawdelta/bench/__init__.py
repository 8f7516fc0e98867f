"""``rawdelta bench``: the benchmark registry, runner and reports.

Modules, one job each:

- :mod:`.registry`: ops x modes x shapes x implementations, as data.
- :mod:`.impls`: how each implementation (rawdelta's backends, the peer, torch SDPA) runs any op.
- :mod:`.workload`: the inputs of one case, from the tests' generators, on the host and the device.
- :mod:`.reference`: the correctness gate against the float64 reference.
- :mod:`.models`: bytes and FLOPs per op and mode, and the floor they give on a device.
- :mod:`.timing`: clocks (CUDA events or wall clock), warm-up, repetitions, peak memory, device ceilings.
- :mod:`.runner`: runs a plan of cases into one results document.
- :mod:`.coldstart`: time to first result in a fresh process with empty compiler caches.
- :mod:`.report` and :mod:`.plots`: tables, the generated region of ``docs/benchmarks.md``, PNG plots.
- :mod:`.command`: the ``rawdelta bench`` subcommand.

Nothing here is imported by ``import rawdelta``; torch, the peer, matplotlib and tqdm are imported lazily.
"""
