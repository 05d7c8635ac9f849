"""The Dagster objects, side by side: assets, asset checks, resources, jobs, schedules and sensors."""
