"""The web server's routes by resource: the studio pages (``pages``), job submission (``submit``) and the jobs
(``jobs``). What they share (the job service, the settings, the answers' base URL) comes from ``state``."""
