"""Web pages served beside the webhook: signed links and the reader."""
