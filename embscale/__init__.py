"""embscale: a scaling-law harness comparing embedding scaling (N-gram Embedding, PLE, PLNE) with expert scaling.

One import namespace, one concern per subpackage, imports pointing down only (``make lint`` checks it)::

    embscale.cli, embscale.commands   the command line
    embscale.analysis, embscale.bench what was learned; how fast it runs
    embscale.sweeps                   what to train and where
    embscale.training                 how one run trains
    embscale.models                   what is trained
    embscale.kernels                  how it is made fast
    embscale.base                     errors, atomic files, the run-folder contract, progress
"""

__version__ = "0.1.0"
