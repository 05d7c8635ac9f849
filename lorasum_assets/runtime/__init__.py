"""Where processes start and what they share: LORASUM_HOME, the Dagster instance, deployments, dead-run recovery, the model cache, the libraries' noise, text tables."""
