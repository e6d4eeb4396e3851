"""python -m jobs: the arq worker of the job layer (batches and housekeeping). Run one or more, anywhere that
reaches the shared Redis; SIGTERM/SIGINT stop it, and a batch it was running is picked up by another."""

from __future__ import annotations

import argparse
import logging

from jobs.worker import build_worker
from shared.logging import configure as configure_logging
from shared.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs")
    parser.add_argument("--max-jobs", type=int, default=10, help="batches run at once by this process")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level, process="jobs")
    # arq logs each cron run (every RECLAIM_EVERY_S) and a health line at INFO; batches log their own events.
    logging.getLogger("arq").setLevel(max(logging.WARNING, logging.getLogger().level))
    build_worker(settings, max_jobs=args.max_jobs).run()


if __name__ == "__main__":
    main()
