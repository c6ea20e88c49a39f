"""Many simulated workers through PgBouncer against the same straight to PostgreSQL, side by side.

Starts a throwaway PostgreSQL 15 (its default max_connections = 100) and a PgBouncer in transaction mode in
front of it, both with the tests' helpers (tests/faults.py: initdb into a temporary folder, free ports), then
runs ``bench/storage.py workers`` through PgBouncer and straight to the server, and prints both tables:
server connections, errors and surplus trials per number of workers.  Needs PostgreSQL 15's binaries and
Debian's pgbouncer package; run as root (the servers run as the postgres user) or as postgres.

    python bench/pgbouncer.py --pool-size 40 --workers 64 128 --direct-workers 128
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # faults.py: ThrowawayPostgres, PgBouncer

from faults import PgBouncer, ThrowawayPostgres  # noqa: E402


def _storage_bench(url: str, workers: list[int], *, trials_per_worker: int, epochs: int) -> int:
    argv = [
        sys.executable, str(ROOT / "bench" / "storage.py"), "workers", "--backends", "postgresql",
        "--workers", *map(str, workers), "--trials-per-worker", str(trials_per_worker), "--epochs", str(epochs),
        "--postgres-url", url,
    ]
    return subprocess.run(argv, check=False).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-size", type=int, default=40, help="PgBouncer's default_pool_size (server connections)")
    parser.add_argument("--workers", type=int, nargs="+", default=[64, 128], help="simulated workers through PgBouncer")
    parser.add_argument("--direct-workers", type=int, nargs="*", default=[128], help="simulated workers straight to the server")
    parser.add_argument("--trials-per-worker", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()

    problem = ThrowawayPostgres.available() or PgBouncer.available()
    if problem:
        print(f"pgbouncer.py: cannot start the servers: {problem}", file=sys.stderr)
        return 2
    server = ThrowawayPostgres().init()
    server.start()
    pooler = PgBouncer(server.url, pool_size=args.pool_size)
    try:
        pooler.start()
        code = 0
        for label, url, workers in (
            (f"through PgBouncer (transaction mode, pool of {args.pool_size})", pooler.url_for(server.url), args.workers),
            ("straight to PostgreSQL (max_connections 100)", server.url, args.direct_workers),
        ):
            if workers:
                print(f"=== {label}", flush=True)
                code = max(code, _storage_bench(url, workers, trials_per_worker=args.trials_per_worker, epochs=args.epochs))
        return code
    finally:
        pooler.stop()
        server.destroy()


if __name__ == "__main__":
    sys.exit(main())
