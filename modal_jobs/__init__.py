"""Modal deployment: the app (image, volume, secrets, GPU drains, launcher, cron, web) over plain functions."""
