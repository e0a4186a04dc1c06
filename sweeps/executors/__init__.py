"""Where runs train: one interface (:mod:`.base`), three executors (:mod:`.debug` in-process, :mod:`.local` a GPU/CPU
queue on this machine, :mod:`.slurm`), the job map that remembers every job (:mod:`.jobmap`), and what works on
job records of any executor (:mod:`.jobs`)."""
