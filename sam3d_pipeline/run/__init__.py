"""One run's steps, its objects, its finish and its report."""
