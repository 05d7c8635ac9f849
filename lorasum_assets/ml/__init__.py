"""Pure ML code: no dagster imports here, so every piece is testable on its own."""
