"""From notebook to production: an experiment as an NVIDIA FLARE job, run by FLARE, read back as a `History`.

>>> import fedkit as fk                                                      # doctest: +SKIP
>>> job = fk.export.nvflare(fk.Experiment.preset("smoke"), "jobs/smoke")     # doctest: +SKIP
>>> flare_run = fk.export.run_in_flare_simulator(job)                        # doctest: +SKIP

nvflare is an optional extra (``pip install 'fedkit[flare]'``); importing this package does not import it.
"""

from .from_flags import job_from_args
from .flare_results import FlareRun, read_flare_history, run_in_flare_simulator
from .job_folder import MARKER, FolderRefused
from .nvflare_job import FlareJob, FlareMissing, nvflare
from .settings import NotExportable, experiment_of, settings_of

__all__ = ["nvflare", "run_in_flare_simulator", "read_flare_history", "FlareJob", "FlareRun", "FlareMissing",
           "FolderRefused", "MARKER", "NotExportable", "settings_of", "experiment_of", "job_from_args"]
