"""The run's state: one SQLite database (WAL) in the run directory, the only persistence.

Every state change is committed, with its event, before the engine acts on it (alone, or in
one `batch` with the other changes of the same moment), so a scheduler killed at any moment
leaves a database that says exactly what was launched (with its process group) and what ended. Readers (`status`, `watch`, `report`) open
it read-only while a run goes on.

Tables:
    experiments  name, phase, template, ord, fingerprint, state, reason, spec (JSON), params (JSON)
    attempts     experiment, number, run_id, state, started_at, ended_at, exit_code, node, gpus,
                 pgid, log_path, peak_bytes, mean_util, oom
    events       t, kind, experiment, message          (what the dashboard and job log show)
    gpu_samples  t, node, gpu, util, used_bytes, total_bytes
    runs         id, started_at, ended_at, pid, host, job_id, exit_code

`Store` is this module's whole API; its parts live beside it, one concern each: store_schema.py
(tables, migrations, rows, the connection and its transactions), store_experiments.py (runs and
experiments), store_attempts.py (attempts) and store_history.py (events, GPU samples, retention).
"""

from __future__ import annotations

# The states live in states.py; re-exported here for the store's many readers.
from .states import (
    A_FAILED as A_FAILED,
    A_INTERRUPTED as A_INTERRUPTED,
    A_LAUNCHING as A_LAUNCHING,
    A_RUNNING as A_RUNNING,
    A_SUCCEEDED as A_SUCCEEDED,
    FAILED as FAILED,
    INTERRUPTED as INTERRUPTED,
    PENDING as PENDING,
    RUNNING as RUNNING,
    SKIPPED as SKIPPED,
    STATES as STATES,
    SUCCEEDED as SUCCEEDED,
)
from .store_attempts import AttemptQueries
from .store_experiments import ExperimentQueries
from .store_history import MAX_EVENTS as MAX_EVENTS
from .store_history import SAMPLE_TIERS as SAMPLE_TIERS
from .store_history import HistoryQueries
from .store_schema import SCHEMA_VERSION as SCHEMA_VERSION
from .store_schema import AttemptRow as AttemptRow
from .store_schema import Event as Event
from .store_schema import ExperimentRow as ExperimentRow
from .store_schema import StoreError as StoreError

# meta key: JSON {"node:index": why} of the GPUs that take no new experiment now (the engine
# writes it when the set changes; the dashboards show the reason on the GPU's row).
UNAVAILABLE_META = "gpus_unavailable"


class Store(ExperimentQueries, AttemptQueries, HistoryQueries):
    """Access to state.db. Writers use `Store(path)`; readers `Store(path, readonly=True)`.
    The connection and transactions are store_schema.Database's; the queries come by table."""
