"""The data lifecycle: the hourly roll-ups of the events (:mod:`.rollup`) and the purge of
what retention no longer keeps (:mod:`.purge`); docs/storage.md."""
