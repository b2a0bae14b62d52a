"""The web server: the studio page, the job API (``/v1/jobs``, jobs are runs of the ``image-to-3d`` deployment)
with signed webhooks, and the review page, in one FastAPI app (``app.create_app``)."""
