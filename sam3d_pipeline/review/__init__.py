"""Human review of masks before reconstruction: the policy (pure) and the review web page (``server``)."""
