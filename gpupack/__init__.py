"""gpupack: pack ML experiments onto the GPUs of one Slurm allocation by memory, skip what
finished, survive preemption. See README.md and DESIGN.md."""

__version__ = "0.1.0"
