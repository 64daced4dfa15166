"""The runner's infrastructure, shared by every entry point and experiment family.

``loop`` (train_and_evaluate), ``checkpoints`` (orbax), ``metrics_io``
(metrics.jsonl writer and reader), ``workdir`` (lock, config.gin), ``sharding``
(meshes, multi-host), ``host_input`` (per-host input: each process reads only
its part of a batch; evaluation split across processes), ``cpu_runtime`` and ``process`` (process settings made by
the entry points), ``configurables`` (gin: method, optimizer), ``paths``
(checkout, gin search path, data directories), ``fault_injection`` (NaN
wrapper for experiments.faults and the tests).
"""
