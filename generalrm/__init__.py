"""Client-side integrations of generalrm: ``generalrm.client`` (sync and async API client) and
``generalrm.verl`` (a ``compute_score`` for veRL). Light to import: httpx and pydantic only."""
