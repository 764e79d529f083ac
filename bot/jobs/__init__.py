"""Scheduled work: the weekly publish-and-push job, its scheduler and the broadcaster."""
