"""Every setting defined once (specs), the profiles built from them, the Dagster config derived from them, and the one reader of LORASUM_* environment variables."""
