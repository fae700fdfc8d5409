"""The name patterns of the things a job names by name, declared once.

The job model validates them (job.py), the model store lists and resolves models by
them (storage/model_store.py). No imports, so both can take them without weight.
"""

# A model: a plain directory or file name in the model store, never a path.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# A job_id: also the Celery task id and the idempotency key.
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
