"""The review page's routes by resource: the pages (``pages``), the paused runs and their files (``runs``), and
the reviewer's answers (``answers``: refine, approve, reject, reprompt). What they share is in ``common``."""
