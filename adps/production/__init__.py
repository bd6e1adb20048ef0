"""Production: the prediction log, the review queue and the drift statistics the monitor flow reports."""
