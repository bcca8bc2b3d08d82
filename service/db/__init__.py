"""The job store's database: models, engine set-up and migrations."""
