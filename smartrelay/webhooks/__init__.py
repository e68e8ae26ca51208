"""Signed webhooks (docs/webhooks.md): the signature (:mod:`.signing`) and the per-endpoint
senders (:mod:`.dispatcher`)."""
