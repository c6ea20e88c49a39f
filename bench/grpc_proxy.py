"""Do heartbeats, stale-trial reaping and retries work through Optuna's gRPC storage proxy? (They do not.)

Starts ``optuna.storages.run_grpc_proxy_server`` on an RDBStorage with heartbeats (1 s, grace 2 s), runs a
trial through ``GrpcStorageProxy`` in a process, kills that process with SIGKILL, waits past the grace period
and calls ``fail_stale_trials`` — what hpo's reaper does — through the proxy and then directly on the database.

    pip install grpcio protobuf
    python bench/grpc_proxy.py

Result with Optuna 5.0.0 (2-core dev machine): the proxy is not a heartbeat storage
(``is_heartbeat_enabled`` False), the client never writes a heartbeat, and the killed worker's trial stays
RUNNING both through the proxy and for a direct RDBStorage with heartbeats: no reaping, no retry, no resume.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import GrpcStorageProxy, RDBStorage, RetryHeartbeatStaleTrialCallback, run_grpc_proxy_server
from optuna.trial import TrialState

# Seconds: the server's heartbeat settings, as hpo would give them.
HEARTBEAT_S = 1
GRACE_S = 2
PORT = 13555


def _serve(url: str) -> None:
    storage = RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    run_grpc_proxy_server(storage, host="127.0.0.1", port=PORT)


def _doomed_worker() -> None:
    study = optuna.load_study(study_name="proxy", storage=GrpcStorageProxy(host="127.0.0.1", port=PORT))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1) + time.sleep(600), n_trials=1)  # type: ignore[operator]


def main() -> int:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'proxy.db'}"
        server = multiprocessing.Process(target=_serve, args=(url,), daemon=True)
        server.start()
        time.sleep(2)  # the server binds its port
        proxy = GrpcStorageProxy(host="127.0.0.1", port=PORT)
        print("proxy is a heartbeat storage:", optuna.storages._heartbeat.is_heartbeat_enabled(proxy))
        study = optuna.create_study(study_name="proxy", storage=proxy)
        worker = multiprocessing.Process(target=_doomed_worker)
        worker.start()
        while not study.get_trials(states=(TrialState.RUNNING,)):
            time.sleep(0.2)
        os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        worker.join()
        time.sleep(GRACE_S + 3)
        optuna.storages.fail_stale_trials(study)
        print("through the proxy, after the grace period:", [t.state.name for t in study.trials])
        direct = optuna.load_study(study_name="proxy", storage=RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S))
        optuna.storages.fail_stale_trials(direct)
        print("directly on the database:", [t.state.name for t in direct.trials])
        server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
