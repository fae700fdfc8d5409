"""Celery tasks: the job as a message, run on a worker, with status and callbacks."""
