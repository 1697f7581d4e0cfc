"""gpupack: pack ML experiments onto the GPUs of one Slurm allocation by memory, skip what
finished, survive preemption. See README.md.

The Python API (README "Python API") is three modules: `gpupack.job` for experiment code,
`gpupack.manifest` (`load`) and `gpupack.simulate` (`simulate`, `plan_data`) to build and check a
plan from Python; each lists its names in `__all__`. Every other module is private: it may
change in any release (use the `gpupack` command instead).
"""

__version__ = "0.1.0"
